//! The few vLLM metric families routing reads from an engine's Prometheus `/metrics` (served on
//! its HTTP port whatever protocol it is called over).

#[derive(Debug, Default, PartialEq)]
pub struct Scrape {
    /// The engine's scrape number (see [`Engine::scrape_sent`]).
    pub seq: u64,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
    pub kv_usage: Option<f64>,
}

/// Read the few vLLM metric families routing needs from a Prometheus text exposition.
pub fn parse_scrape(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("vllm:cache_config_info{") {
            s.block_size = label(rest, "block_size").and_then(|v| v.parse().ok());
            s.num_gpu_blocks = label(rest, "num_gpu_blocks").and_then(|v| v.parse().ok());
        } else if line.starts_with("vllm:kv_cache_usage_perc") {
            s.kv_usage = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite());
        }
    }
    s
}

pub(crate) fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    // Only whole label names count (`block_size`, not `mamba_block_size`).
    let start = labels
        .match_indices(&key)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || matches!(labels.as_bytes()[i - 1], b',' | b'{'))?
        + key.len();
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}
