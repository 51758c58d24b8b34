//! Model and GPU profiles: the static inputs of the timing model (`perf-model.md` §2.1–2.2).
//!
//! Everything here is a pure function of a model name, a GPU kind and a TP degree. The numbers are
//! the ones `perf-model.md` uses for its predictions, so the anchors in `cost.rs` tests can be
//! checked against the spec's own arithmetic.

use std::fmt;
use std::time::Duration;

/// Bytes per element of bf16 weights and bf16 KV cache (the only dtype we model for now).
const BF16_BYTES: f64 = 2.0;
/// Bytes per KV element; kept as an integer so KV sizes stay exact.
const KV_ELEM_BYTES: u64 = 2;

/// The GPU an instance runs on. Only the two parts the spec calibrates are modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuKind {
    /// H100 SXM 80 GB.
    H100,
    /// H200 SXM 141 GB (same die as H100, more and faster HBM).
    H200,
}

impl GpuKind {
    /// All kinds, in a stable order (for help texts and sweeps).
    pub const ALL: [GpuKind; 2] = [GpuKind::H100, GpuKind::H200];

    /// Parses `"h100"` / `"h200"`, case-insensitive.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The lower-case name accepted by [`GpuKind::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            GpuKind::H100 => "h100",
            GpuKind::H200 => "h200",
        }
    }

    /// Per-GPU hardware constants, `perf-model.md` §2.1 (BLIS `hardware_config.json` for H100; H200 spec
    /// pages for 141 GB / 4.8 TB/s). Dense (not sparse) FLOPS. Memory sizes are decimal GB, as the
    /// spec's capacity arithmetic (§2.2: "8B H100 ≈ 400 k tokens") uses them.
    pub fn spec(&self) -> GpuSpec {
        match self {
            GpuKind::H100 => GpuSpec {
                bf16_flops: 989.5e12,
                fp8_flops: 1979e12,
                hbm_bytes: 80e9,
                hbm_bw: 3.35e12,
                h2d_bw: H2D_BW_PCIE5,
            },
            // Same die as H100, so compute is unchanged; only HBM capacity and bandwidth differ.
            GpuKind::H200 => GpuSpec {
                bf16_flops: 989.5e12,
                fp8_flops: 1979e12,
                hbm_bytes: 141e9,
                hbm_bw: 4.8e12,
                h2d_bw: H2D_BW_PCIE5,
            },
        }
    }
}

impl fmt::Display for GpuKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-GPU hardware constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    /// Dense BF16 peak, FLOP/s.
    pub bf16_flops: f64,
    /// Dense FP8 peak, FLOP/s.
    pub fp8_flops: f64,
    /// HBM capacity, bytes.
    pub hbm_bytes: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bw: f64,
    /// Host → GPU copy bandwidth achieved from pinned host memory, bytes/s: the `B_h2d` of
    /// perf-model §2.4's `c_load`, for loading offloaded KV back.
    pub h2d_bw: f64,
}

/// PCIe Gen5 x16 (H100 and H200 SXM hosts): 64 GB/s per direction on the wire, of which pinned
/// `cudaMemcpyAsync` reaches about 55.
const H2D_BW_PCIE5: f64 = 55e9;

/// Architecture facts of one model: what the timing and capacity formulas need, nothing more.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Short key, e.g. `"llama-3.1-8b"`.
    pub name: &'static str,
    /// Hugging Face id that vLLM would serve it under, e.g. `"meta-llama/Llama-3.1-8B-Instruct"`.
    pub served_name: &'static str,
    /// Parameters excluding the input embedding and LM head: the `P` of the FLOP formulas (each
    /// prompt token runs through these; the LM head only runs on sampled positions).
    pub params_non_embedding: f64,
    /// All parameters (embedding and LM head counted separately when untied): the weight bytes read
    /// per decode step and resident in HBM.
    pub params_all: f64,
    pub num_layers: u32,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    pub max_model_len: u32,
    /// TP degree the spec assumes for this model on H100.
    pub default_tp: u32,
}

// Parameter counts are computed from each model's `config.json` (hidden size, intermediate size,
// layer count, head counts, vocab, tied or not), ignoring norms (<0.01 %):
//   per layer = hidden·(q_heads + 2·kv_heads)·head_dim + q_heads·head_dim·hidden + 3·hidden·intermediate.
// Head counts and KV sizes cross-checked against `perf-model.md` §2.2.
static MODELS: [ModelSpec; 4] = [
    // meta-llama/Llama-3.1-8B-Instruct: hidden 4096, intermediate 14336, 32 layers, 32 q / 8 kv
    // heads, vocab 128256, untied embeddings. 218.1 M/layer · 32 = 6.98 B; + 2 · 525 M embeddings.
    ModelSpec {
        name: "llama-3.1-8b",
        served_name: "meta-llama/Llama-3.1-8B-Instruct",
        params_non_embedding: 6.98e9,
        params_all: 8.03e9,
        num_layers: 32,
        num_q_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        max_model_len: 131_072,
        default_tp: 1,
    },
    // meta-llama/Llama-3.1-70B-Instruct: hidden 8192, intermediate 28672, 80 layers, 64 q / 8 kv
    // heads, untied. 855.6 M/layer · 80 = 68.5 B; + 2 · 1.05 B embeddings = 70.6 B.
    ModelSpec {
        name: "llama-3.1-70b",
        served_name: "meta-llama/Llama-3.1-70B-Instruct",
        params_non_embedding: 68.5e9,
        params_all: 70.6e9,
        num_layers: 80,
        num_q_heads: 64,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        max_model_len: 131_072,
        default_tp: 4,
    },
    // Qwen/Qwen3-32B: hidden 5120, intermediate 25600, 64 layers, 64 q / 8 kv heads of dim 128
    // (q projection is wider than hidden), vocab 151936, untied, max_position_embeddings 40960.
    // 487.6 M/layer · 64 = 31.2 B; + 2 · 778 M embeddings = 32.8 B. TP2 is the llm-d setup (§1.5).
    ModelSpec {
        name: "qwen3-32b",
        served_name: "Qwen/Qwen3-32B",
        params_non_embedding: 31.2e9,
        params_all: 32.8e9,
        num_layers: 64,
        num_q_heads: 64,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 151_936,
        max_model_len: 40_960,
        default_tp: 2,
    },
    // Qwen/Qwen3-0.6B: hidden 1024, intermediate 3072, 28 layers, 16 q / 8 kv heads of dim 128,
    // tied embeddings (155.6 M counted once). 15.7 M/layer · 28 = 0.44 B. Cheap model for tests.
    ModelSpec {
        name: "qwen3-0.6b",
        served_name: "Qwen/Qwen3-0.6B",
        params_non_embedding: 0.44e9,
        params_all: 0.6e9,
        num_layers: 28,
        num_q_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 151_936,
        max_model_len: 40_960,
        default_tp: 1,
    },
];

impl ModelSpec {
    /// Finds a model by short key (`llama-3.1-8b`), served name (`meta-llama/Llama-3.1-8B-Instruct`)
    /// or the served name without its org prefix (`Llama-3.1-8B-Instruct`), case-insensitive.
    pub fn lookup(name: &str) -> Option<&'static ModelSpec> {
        let name = name.trim();
        MODELS.iter().find(|m| {
            let base = m.served_name.rsplit('/').next().unwrap_or(m.served_name);
            [m.name, m.served_name, base]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(name))
        })
    }

    /// Every known model.
    pub fn all() -> &'static [ModelSpec] {
        &MODELS
    }

    /// KV bytes per token for the whole model (all TP ranks together), bf16:
    /// `2 (K and V) · L · kv_heads · head_dim · 2 bytes` (`perf-model.md` §2.2).
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.num_layers)
            * u64::from(self.num_kv_heads)
            * u64::from(self.head_dim)
            * KV_ELEM_BYTES
    }

    /// Attention width `d_att = q_heads · head_dim` of the attention FLOP term (§2.4).
    pub fn attention_dim(&self) -> u32 {
        self.num_q_heads * self.head_dim
    }
}

/// Why a profile could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown model `{0}`; known: {known}", known = known_models())]
    UnknownModel(String),
    #[error("tensor-parallel size must be at least 1")]
    ZeroTp,
    /// vLLM requires the attention heads to split evenly across ranks, and KV heads to either split
    /// evenly or be replicated evenly.
    #[error("tensor-parallel size {tp} does not divide {model}'s {q_heads} attention heads / {kv_heads} KV heads")]
    IndivisibleTp {
        model: &'static str,
        tp: u32,
        q_heads: u32,
        kv_heads: u32,
    },
    /// vLLM refuses to start when the weights leave no room for a single KV block; so do we.
    #[error(
        "{model} at TP{tp} on {gpu} leaves no memory for the KV cache (weights {weights_gb:.1} GB)"
    )]
    NoKvMemory {
        model: &'static str,
        gpu: GpuKind,
        tp: u32,
        weights_gb: f64,
    },
}

fn known_models() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// One simulated instance: a model on `tp` GPUs of one kind, plus the calibrated efficiencies and
/// overheads of `perf-model.md` §2.4. Fields are public so experiments can override any default.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub model: ModelSpec,
    pub gpu: GpuKind,
    pub tp: u32,
    /// μ, prefill MFU against dense BF16 peak. Spec default 0.55 (implied 0.45–0.74 on modern vLLM).
    pub mfu: f64,
    /// η, achieved fraction of HBM bandwidth in decode. Spec default 0.7 (Vidur b=1 floors ⇒ 0.71).
    pub hbm_eff: f64,
    /// Per-request overhead: HTTP, tokenisation, scheduling (BLIS's fitted α0 ≈ 10–16 ms).
    pub c_req: Duration,
    /// Per-step CPU and kernel-launch overhead.
    pub c_step: Duration,
    /// TP all-reduce cost per layer (two all-reduces of ≈8 µs over NVLink); zero at TP1.
    pub c_tp_per_layer: Duration,
    /// vLLM `--gpu-memory-utilization`.
    pub gpu_memory_utilization: f64,
    /// Activation / workspace memory reserved per GPU before the KV cache is sized.
    pub activation_bytes_per_gpu: f64,
}

/// Spec defaults (§2.4); see the field docs on [`Profile`].
const DEFAULT_MFU: f64 = 0.55;
const DEFAULT_HBM_EFF: f64 = 0.7;
const DEFAULT_C_REQ: Duration = Duration::from_millis(10);
const DEFAULT_C_STEP: Duration = Duration::from_millis(1);
const ALL_REDUCE_LATENCY: Duration = Duration::from_micros(8);
const ALL_REDUCES_PER_LAYER: u32 = 2;
const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;
const DEFAULT_ACTIVATION_BYTES_PER_GPU: f64 = 4e9;

impl Profile {
    /// Builds the profile for `model` (short key or served name) on `tp` GPUs (`None` = the model's
    /// default TP) with the spec's default efficiencies.
    pub fn new(model: &str, gpu: GpuKind, tp: Option<u32>) -> Result<Profile, ProfileError> {
        let spec = ModelSpec::lookup(model)
            .ok_or_else(|| ProfileError::UnknownModel(model.to_string()))?;
        let tp = tp.unwrap_or(spec.default_tp);
        if tp == 0 {
            return Err(ProfileError::ZeroTp);
        }
        let kv = spec.num_kv_heads;
        if !spec.num_q_heads.is_multiple_of(tp) || !(kv.is_multiple_of(tp) || tp.is_multiple_of(kv))
        {
            return Err(ProfileError::IndivisibleTp {
                model: spec.name,
                tp,
                q_heads: spec.num_q_heads,
                kv_heads: kv,
            });
        }
        let c_tp_per_layer = if tp > 1 {
            ALL_REDUCE_LATENCY * ALL_REDUCES_PER_LAYER
        } else {
            Duration::ZERO
        };
        let profile = Profile {
            model: spec.clone(),
            gpu,
            tp,
            mfu: DEFAULT_MFU,
            hbm_eff: DEFAULT_HBM_EFF,
            c_req: DEFAULT_C_REQ,
            c_step: DEFAULT_C_STEP,
            c_tp_per_layer,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            activation_bytes_per_gpu: DEFAULT_ACTIVATION_BYTES_PER_GPU,
        };
        if profile.kv_capacity_tokens() == 0 {
            return Err(ProfileError::NoKvMemory {
                model: spec.name,
                gpu,
                tp,
                weights_gb: profile.weight_bytes() / 1e9,
            });
        }
        Ok(profile)
    }

    /// Resident weight bytes for the whole instance (bf16), also the bytes streamed per decode step.
    pub fn weight_bytes(&self) -> f64 {
        self.model.params_all * BF16_BYTES
    }

    /// KV bytes per token for the whole instance. Equals the model's figure unless `tp` exceeds the
    /// KV head count, in which case vLLM replicates KV heads so each rank holds one.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let tp = self.tp.max(1);
        let heads_per_rank = (self.model.num_kv_heads / tp).max(1);
        let replication =
            u64::from(heads_per_rank * tp) / u64::from(self.model.num_kv_heads.max(1));
        self.model.kv_bytes_per_token() * replication.max(1)
    }

    /// KV byte count of `tokens` tokens (the payload of a P→D transfer of that many tokens).
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        tokens.saturating_mul(self.kv_bytes_per_token())
    }

    /// Bytes left for the KV cache: `TP·HBM·util − weights − TP·activations`, clamped at zero.
    pub fn kv_cache_bytes(&self) -> f64 {
        let tp = f64::from(self.tp);
        let budget = tp * self.gpu.spec().hbm_bytes * self.gpu_memory_utilization;
        (budget - self.weight_bytes() - tp * self.activation_bytes_per_gpu).max(0.0)
    }

    /// Tokens of KV the instance can hold (§2.2: 8B H100 ≈ 400 k, 8B H200 ≈ 815 k).
    pub fn kv_capacity_tokens(&self) -> u64 {
        let kv_b = self.kv_bytes_per_token();
        if kv_b == 0 {
            return 0;
        }
        // `as` saturates for huge floats and the budget is already non-negative.
        (self.kv_cache_bytes() / kv_b as f64).floor() as u64
    }

    /// vLLM's `num_gpu_blocks` for a block size in tokens: whole blocks only. Zero for block size 0.
    pub fn num_gpu_blocks(&self, block_size: u32) -> u32 {
        if block_size == 0 {
            return 0;
        }
        let blocks = self.kv_capacity_tokens() / u64::from(block_size);
        u32::try_from(blocks).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_close(actual: f64, expected: f64, tol: f64) -> bool {
        (actual - expected).abs() <= tol * expected.abs()
    }

    #[test]
    fn gpu_parse_and_name_round_trip() {
        for g in GpuKind::ALL {
            assert_eq!(GpuKind::parse(g.name()), Some(g));
            assert_eq!(GpuKind::parse(&g.name().to_uppercase()), Some(g));
            assert_eq!(g.to_string(), g.name());
        }
        assert_eq!(GpuKind::parse("a100"), None);
        assert_eq!(GpuKind::parse(""), None);
    }

    #[test]
    fn h200_differs_only_in_memory() {
        let (h100, h200) = (GpuKind::H100.spec(), GpuKind::H200.spec());
        assert_eq!(h100.bf16_flops, h200.bf16_flops);
        assert_eq!(h100.fp8_flops, h200.fp8_flops);
        assert!(h200.hbm_bw > h100.hbm_bw && h200.hbm_bytes > h100.hbm_bytes);
    }

    #[test]
    fn lookup_accepts_key_served_name_and_basename() {
        for m in ModelSpec::all() {
            assert_eq!(ModelSpec::lookup(m.name), Some(m));
            assert_eq!(ModelSpec::lookup(m.served_name), Some(m));
            assert_eq!(ModelSpec::lookup(&m.served_name.to_lowercase()), Some(m));
            assert_eq!(ModelSpec::lookup(&m.name.to_uppercase()), Some(m));
        }
        assert_eq!(
            ModelSpec::lookup("Llama-3.1-8B-Instruct").map(|m| m.name),
            Some("llama-3.1-8b")
        );
        assert!(ModelSpec::lookup("gpt-2").is_none());
    }

    #[test]
    fn kv_bytes_per_token_match_spec_table() {
        // perf-model.md §2.2 table.
        let expect = [
            ("llama-3.1-8b", 131_072),
            ("llama-3.1-70b", 327_680),
            ("qwen3-32b", 262_144),
            ("qwen3-0.6b", 2 * 28 * 8 * 128 * 2),
        ];
        for (name, bytes) in expect {
            let m = ModelSpec::lookup(name).unwrap();
            assert_eq!(m.kv_bytes_per_token(), bytes, "{name}");
            let p = Profile::new(name, GpuKind::H100, None).unwrap();
            assert_eq!(p.kv_bytes_per_token(), bytes, "{name} profile");
        }
    }

    #[test]
    fn parameter_counts_follow_from_architecture() {
        // Re-derive the non-embedding count from the config shapes quoted in the comments, to catch
        // typos in the table (hidden, intermediate) per model; tolerance covers rounding to 3 digits.
        let shapes = [
            ("llama-3.1-8b", 4096.0, 14336.0),
            ("llama-3.1-70b", 8192.0, 28672.0),
            ("qwen3-32b", 5120.0, 25600.0),
            ("qwen3-0.6b", 1024.0, 3072.0),
        ];
        for (name, hidden, inter) in shapes {
            let m = ModelSpec::lookup(name).unwrap();
            let hd = f64::from(m.head_dim);
            let attn = hidden * f64::from(m.num_q_heads + 2 * m.num_kv_heads) * hd
                + f64::from(m.num_q_heads) * hd * hidden;
            let per_layer = attn + 3.0 * hidden * inter;
            let p = per_layer * f64::from(m.num_layers);
            assert!(rel_close(m.params_non_embedding, p, 0.01), "{name}: {p:e}");
            let embed = hidden * f64::from(m.vocab_size);
            let extra = m.params_all - m.params_non_embedding;
            assert!(
                rel_close(extra, embed, 0.05) || rel_close(extra, 2.0 * embed, 0.05),
                "{name}: embeddings {extra:e} vs {embed:e}"
            );
        }
    }

    #[test]
    fn default_tp_and_overrides() {
        let p = Profile::new("qwen3-32b", GpuKind::H100, None).unwrap();
        assert_eq!(p.tp, 2);
        assert_eq!(p.c_tp_per_layer, Duration::from_micros(16));
        let p = Profile::new("llama-3.1-8b", GpuKind::H100, None).unwrap();
        assert_eq!(p.tp, 1);
        assert_eq!(p.c_tp_per_layer, Duration::ZERO);
        assert_eq!(p.c_req, Duration::from_millis(10));
        assert_eq!(p.c_step, Duration::from_millis(1));
        let p = Profile::new("llama-3.1-70b", GpuKind::H100, Some(8)).unwrap();
        assert_eq!(p.tp, 8);
    }

    #[test]
    fn errors() {
        let e = Profile::new("nope", GpuKind::H100, None).unwrap_err();
        assert!(matches!(e, ProfileError::UnknownModel(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("nope") && msg.contains("llama-3.1-8b"),
            "{msg}"
        );
        assert!(matches!(
            Profile::new("llama-3.1-8b", GpuKind::H100, Some(0)),
            Err(ProfileError::ZeroTp)
        ));
        assert!(matches!(
            Profile::new("llama-3.1-8b", GpuKind::H100, Some(3)),
            Err(ProfileError::IndivisibleTp { .. })
        ));
        // 141 GB of weights on two 80 GB GPUs: vLLM would fail to allocate any KV block.
        assert!(matches!(
            Profile::new("llama-3.1-70b", GpuKind::H100, Some(2)),
            Err(ProfileError::NoKvMemory { .. })
        ));
    }

    #[test]
    fn kv_heads_replicate_beyond_their_count() {
        // qwen3-0.6b has 8 KV heads; at TP16 each rank still holds one, so the instance stores 2×.
        let p = Profile::new("qwen3-0.6b", GpuKind::H100, Some(16)).unwrap();
        assert_eq!(p.kv_bytes_per_token(), 2 * p.model.kv_bytes_per_token());
    }

    #[test]
    fn kv_capacity_matches_spec() {
        // perf-model.md §2.2: 8B H100 ≈ 400 k; 8B H200 ≈ 815 k; 70B TP4 H100 ≈ 400 k;
        // 70B TP8 H100 ≈ 1.23 M; 70B TP4 H200 ≈ 1.07 M; Qwen3-32B TP2 H100 ≈ 270 k.
        let cases = [
            ("llama-3.1-8b", GpuKind::H100, None, 400e3),
            ("llama-3.1-8b", GpuKind::H200, None, 815e3),
            ("llama-3.1-70b", GpuKind::H100, None, 400e3),
            ("llama-3.1-70b", GpuKind::H100, Some(8), 1.23e6),
            ("llama-3.1-70b", GpuKind::H200, None, 1.07e6),
            ("qwen3-32b", GpuKind::H100, None, 270e3),
        ];
        for (name, gpu, tp, expect) in cases {
            let p = Profile::new(name, gpu, tp).unwrap();
            let got = p.kv_capacity_tokens() as f64;
            eprintln!(
                "kv capacity {name} {gpu} TP{}: {got:.0} tokens (spec ≈ {expect:.0})",
                p.tp
            );
            assert!(rel_close(got, expect, 0.10), "{name} {gpu}: {got}");
        }
    }

    #[test]
    fn num_gpu_blocks_is_capacity_over_block_size() {
        let p = Profile::new("llama-3.1-8b", GpuKind::H100, None).unwrap();
        let blocks = p.num_gpu_blocks(16);
        eprintln!("8B H100 num_gpu_blocks(16) = {blocks}");
        assert!(rel_close(f64::from(blocks), 400e3 / 16.0, 0.10));
        assert_eq!(u64::from(blocks), p.kv_capacity_tokens() / 16);
        let h200 = Profile::new("llama-3.1-8b", GpuKind::H200, None).unwrap();
        let blocks = h200.num_gpu_blocks(16);
        eprintln!("8B H200 num_gpu_blocks(16) = {blocks}");
        assert!(rel_close(f64::from(blocks), 815e3 / 16.0, 0.10));
        assert_eq!(p.num_gpu_blocks(0), 0);
    }

    #[test]
    fn weights_are_bf16() {
        let p = Profile::new("llama-3.1-8b", GpuKind::H100, None).unwrap();
        assert_eq!(p.weight_bytes(), 16.06e9);
        assert_eq!(p.kv_bytes(4096), 4096 * 131_072);
    }
}
