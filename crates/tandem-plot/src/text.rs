//! Text without a font library: a backend wrapper that measures every string with the embedded
//! DejaVu Sans (`ab_glyph`) and, on the bitmap, rasterises it too.
//!
//! plotters' own font features either need the system's fontconfig and freetype (`ttf`) or keep
//! fonts in a process-wide table (`ab_glyph`), and a plotters feature turned on here would be on
//! for every crate of a workspace build (criterion's charts included, which would then find no
//! font). So plotters runs with its built-in text stub, and this wrapper does the text: the same
//! measurements lay out the PNG and the SVG, and the SVG keeps real `<text>` elements.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
};

const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// The embedded font, parsed (cheap: it borrows the bytes).
pub(crate) fn font() -> FontRef<'static> {
    // The file is compiled in; the tests render every chart, so a bad file cannot ship.
    FontRef::try_from_slice(FONT).expect("the embedded DejaVu Sans parses")
}

/// A backend whose text is measured, and on a bitmap drawn, with the embedded font.
pub(crate) struct Texted<B> {
    inner: B,
    font: FontRef<'static>,
    /// Rasterise text here (bitmap); otherwise hand it to the backend (SVG `<text>`).
    raster: bool,
}

impl<B> Texted<B> {
    pub(crate) fn raster(inner: B) -> Self {
        Texted {
            inner,
            font: font(),
            raster: true,
        }
    }

    pub(crate) fn vector(inner: B) -> Self {
        Texted {
            inner,
            font: font(),
            raster: false,
        }
    }
}

/// Width and height, px, of `text` at plotters' `size` (the font's pixel height).
pub(crate) fn measure(font: &FontRef<'_>, size: f64, text: &str) -> (f32, f32) {
    let f = font.as_scaled(PxScale::from(size as f32));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let g = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, g);
        }
        w += f.h_advance(g);
        prev = Some(g);
    }
    (w, f.ascent() - f.descent())
}

impl<B: DrawingBackend> DrawingBackend for Texted<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h) = measure(&self.font, style.size(), text);
        Ok((w.ceil() as u32, h.ceil() as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        if !self.raster {
            return self.inner.draw_text(text, style, pos);
        }
        let colour = style.color();
        if colour.alpha == 0.0 {
            return Ok(());
        }
        let (w, h) = measure(&self.font, style.size(), text);
        // The anchor is a corner, an edge's middle or the centre of the text's box.
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let scale = PxScale::from(style.size() as f32);
        let f = self.font.as_scaled(scale);
        let turn = style.transform();
        let mut caret = 0.0;
        let mut prev = None;
        let mut ink: Vec<(i32, i32, f32)> = Vec::new();
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                caret += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(scale, point(caret + dx, f.ascent() + dy));
            caret += f.h_advance(id);
            prev = Some(id);
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|x, y, cover| {
                    let (x, y) = (b.min.x as i32 + x as i32, b.min.y as i32 + y as i32);
                    ink.push((x, y, cover));
                });
            }
        }
        for (x, y, cover) in ink {
            if cover <= 0.0 {
                continue;
            }
            let (x, y) = turn.transform(x, y);
            let c = BackendColor {
                alpha: colour.alpha * f64::from(cover.min(1.0)),
                rgb: colour.rgb,
            };
            self.inner.draw_pixel((pos.0 + x, pos.1 + y), c)?;
        }
        Ok(())
    }
}
