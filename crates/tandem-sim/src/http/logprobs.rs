//! Pseudo-logprobs, and vLLM's three response shapes for them.
//!
//! The simulator has no logits, so each position gets a made-up distribution that is a pure
//! function of (prompt, choice, position, token): the same on every engine, colocated or
//! disaggregated. It is shaped like a real one: rank 1 holds 35–95 % of the mass, each further
//! rank under half of the one before, so the top list is sorted descending and sums below 1.
//! Output tokens are rank 1 (greedy-consistent: the sampled token is the most likely one);
//! prompt tokens get a drawn rank, which may fall outside the top k, as real prompts do.
//!
//! Shapes (vLLM `serving_completion._create_completion_logprobs`,
//! `serving_chat._create_chat_logprobs`, `RequestOutput.prompt_logprobs`):
//! - completions: `{"text_offset", "token_logprobs", "tokens", "top_logprobs": [{text: lp}]}`,
//!   each top dict the token itself plus the top k (k + 1 entries when it is not among them);
//! - chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [k entries]}]}`;
//! - prompt logprobs: `[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]`.

use serde_json::{json, Map, Value};

use crate::sampler::mix;
use crate::tokenizer::SimTokenizer;

/// vLLM's stand-in for `-inf` (JSON has no infinities).
const FLOOR: f64 = -9999.0;

/// One candidate at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: u32,
    pub logprob: f64,
    pub rank: u32,
}

/// Where pseudo-logprobs come from: the tokenizer (to spell tokens) and the ids alternatives
/// are drawn from (the sampler's, so alternatives read like the output).
pub struct Lp<'a> {
    pub tok: &'a SimTokenizer,
    pub alts: &'a [u32],
}

const TAG_SAMPLE: u64 = 0x5a3f_17c0_d2b4_e901;
const TAG_PROMPT: u64 = 0x0be1_9c47_3a6d_f215;

impl Lp<'_> {
    /// Output token `token` at `position` of choice `index`: rank 1, then ranks 2..=k.
    pub fn sampled(
        &self,
        fingerprint: u64,
        index: u32,
        position: usize,
        token: u32,
        k: usize,
    ) -> Vec<Entry> {
        let key = mix(mix(mix(fingerprint ^ TAG_SAMPLE) ^ u64::from(index)) ^ position as u64);
        self.position(mix(key ^ u64::from(token)), token, 1, k)
    }

    /// Prompt token `prompt[i]` (i ≥ 1, conditioned on the tokens before it).
    pub fn prompt(&self, fingerprint: u64, prompt: &[u32], i: usize, k: usize) -> Vec<Entry> {
        let token = prompt[i];
        let key = mix(mix(mix(fingerprint ^ TAG_PROMPT) ^ i as u64) ^ u64::from(token));
        // Half the prompt tokens are the model's first guess; the rest rank 2..=9.
        let rank = if key & 1 == 0 {
            1
        } else {
            2 + ((key >> 1) % 8) as u32
        };
        self.position(key, token, rank, k)
    }

    /// The position's list in vLLM's dict order: the actual token (with its rank) first, then
    /// ranks 1..=k without it.
    fn position(&self, key: u64, actual: u32, actual_rank: u32, k: usize) -> Vec<Entry> {
        let depth = (k as u32).max(actual_rank);
        let mut ids = Vec::with_capacity(depth as usize);
        let mut used = vec![actual];
        let mut probe = mix(key ^ 0x51);
        for rank in 1..=depth {
            if rank == actual_rank {
                ids.push(actual);
                continue;
            }
            // Distinct alternatives: probe the list from a drawn start (bounded, so a small
            // vocabulary just yields a shorter list).
            probe = mix(probe);
            let start = (probe % self.alts.len().max(1) as u64) as usize;
            let found = (0..self.alts.len())
                .map(|j| self.alts[(start + j) % self.alts.len()])
                .find(|id| !used.contains(id));
            let Some(id) = found else {
                if rank > actual_rank {
                    break;
                }
                continue;
            };
            used.push(id);
            ids.push(id);
        }
        let p1 = 0.35 + 0.6 * unit(mix(key ^ 0x1));
        let logprob = |rank: u32| -> f64 {
            let p = if rank == 1 {
                p1
            } else {
                let f = 0.75 + 0.25 * unit(mix(key ^ u64::from(rank)));
                (1.0 - p1) * 0.5f64.powi(rank as i32 - 1) * f
            };
            p.ln().max(FLOOR)
        };
        // Ranks as listed: the actual token keeps its own; the others are numbered in order
        // (a missing alternative shifts the ones after it up).
        let ranked: Vec<Entry> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let rank = if id == actual {
                    actual_rank
                } else {
                    i as u32 + 1
                };
                Entry {
                    id,
                    logprob: logprob(rank),
                    rank,
                }
            })
            .collect();
        let mut out = Vec::with_capacity(k + 1);
        out.extend(ranked.iter().find(|e| e.id == actual).cloned());
        out.extend(
            ranked
                .into_iter()
                .filter(|e| e.rank as usize <= k && e.id != actual),
        );
        out
    }

    pub fn spell(&self, id: u32) -> String {
        self.tok.decode(&[id]).unwrap_or_default()
    }

    /// One chat `content` entry: the token and its first `k` list entries.
    pub fn chat_entry(&self, entries: &[Entry], k: usize) -> Value {
        let one = |e: &Entry| {
            let token = self.spell(e.id);
            json!({"token": token, "logprob": e.logprob, "bytes": token.as_bytes()})
        };
        let mut v = one(&entries[0]);
        v["top_logprobs"] = entries.iter().take(k).map(one).collect();
        v
    }

    /// `prompt_logprobs` of a prompt: `null` for the first token, then one dict per token.
    pub fn prompt_list(&self, fingerprint: u64, prompt: &[u32], k: usize) -> Value {
        let mut out = vec![Value::Null];
        for i in 1..prompt.len() {
            let mut m = Map::new();
            for e in self.prompt(fingerprint, prompt, i, k) {
                m.insert(
                    e.id.to_string(),
                    json!({"logprob": e.logprob, "rank": e.rank, "decoded_token": self.spell(e.id)}),
                );
            }
            out.push(Value::Object(m));
        }
        Value::Array(out)
    }
}

/// Completions logprobs, built token by token; `text_offset` continues across [`Self::take`]s
/// (one per streamed chunk).
#[derive(Debug, Default)]
pub struct CompletionShape {
    offset: usize,
    text_offset: Vec<usize>,
    token_logprobs: Vec<Value>,
    tokens: Vec<String>,
    top_logprobs: Vec<Value>,
}

impl CompletionShape {
    /// A token and its list (`None`: the first prompt token, which has no logprob).
    pub fn push(&mut self, lp: &Lp, id: u32, entries: Option<&[Entry]>, k: usize) {
        let token = lp.spell(id);
        self.text_offset.push(self.offset);
        // Python's `len(token)`: characters.
        self.offset += token.chars().count();
        match entries {
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
            Some(entries) => {
                self.token_logprobs.push(entries[0].logprob.into());
                let mut top = Map::new();
                for e in entries.iter().take(k + 1) {
                    top.insert(lp.spell(e.id), e.logprob.into());
                }
                self.top_logprobs.push(Value::Object(top));
            }
        }
        self.tokens.push(token);
    }

    /// The tokens pushed since the last take, as JSON.
    pub fn take(&mut self) -> Value {
        json!({
            "text_offset": std::mem::take(&mut self.text_offset),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "tokens": std::mem::take(&mut self.tokens),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
        })
    }
}

/// Uniform in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(tok: &SimTokenizer) -> Lp<'_> {
        static ALTS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
        let alts = ALTS.get_or_init(|| (97..123).chain([32]).collect());
        Lp { tok, alts }
    }

    #[test]
    fn sampled_token_is_rank_one_sorted_and_below_one_in_sum() {
        let t = SimTokenizer::byte_level();
        let l = lp(&t);
        for pos in 0..200 {
            let token = 97 + (pos % 26) as u32;
            let e = l.sampled(42, 0, pos, token, 20);
            assert_eq!(e.len(), 20);
            assert_eq!((e[0].id, e[0].rank), (token, 1));
            assert!(e.windows(2).all(|w| w[0].logprob > w[1].logprob), "{e:?}");
            assert!(e.iter().all(|x| x.logprob <= 0.0 && x.logprob > FLOOR));
            let mass: f64 = e.iter().map(|x| x.logprob.exp()).sum();
            assert!(mass < 1.0, "{mass}");
            let ids: std::collections::HashSet<u32> = e.iter().map(|x| x.id).collect();
            assert_eq!(ids.len(), e.len(), "distinct ids");
            assert_eq!(e, l.sampled(42, 0, pos, token, 20), "deterministic");
            assert!(e.iter().zip(1..).all(|(x, r)| x.rank == r));
        }
        assert_eq!(l.sampled(1, 0, 0, 97, 0).len(), 1);
    }

    #[test]
    fn prompt_tokens_keep_their_rank_first() {
        let t = SimTokenizer::byte_level();
        let l = lp(&t);
        let prompt: Vec<u32> = "hello world, again".bytes().map(u32::from).collect();
        let mut outside = 0;
        for i in 1..prompt.len() {
            let e = l.prompt(7, &prompt, i, 3);
            assert_eq!(e[0].id, prompt[i]);
            if e[0].rank > 3 {
                outside += 1;
                assert_eq!(e.len(), 4);
                assert!(e[1..].iter().all(|x| x.logprob > e[0].logprob));
            } else {
                assert_eq!(e.len(), 3);
            }
            let mut top: Vec<&Entry> = e.iter().collect();
            top.sort_by_key(|x| x.rank);
            assert!(top.windows(2).all(|w| w[0].logprob > w[1].logprob));
        }
        assert!(outside > 0, "some prompt tokens rank outside the top 3");
        let list = l.prompt_list(7, &prompt, 2);
        assert_eq!(list[0], Value::Null);
        assert_eq!(list.as_array().unwrap().len(), prompt.len());
        let first = list[1].as_object().unwrap();
        let (id, v) = first.iter().next().unwrap();
        assert_eq!(id, &prompt[1].to_string());
        assert!(v["rank"].as_u64().unwrap() >= 1);
        assert_eq!(v["decoded_token"], "e");
    }

    #[test]
    fn shapes_match_vllm() {
        let t = SimTokenizer::byte_level();
        let l = lp(&t);
        let mut c = CompletionShape::default();
        c.push(&l, 104, None, 2);
        let e = l.sampled(1, 0, 0, 105, 2);
        c.push(&l, 105, Some(&e), 2);
        let v = c.take();
        assert_eq!(v["tokens"], json!(["h", "i"]));
        assert_eq!(v["text_offset"], json!([0, 1]));
        assert_eq!(v["token_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][1].as_object().unwrap().len(), 2);
        assert_eq!(v["top_logprobs"][1]["i"], v["token_logprobs"][1]);
        c.push(&l, 106, Some(&e), 2);
        assert_eq!(c.take()["text_offset"], json!([2]), "offsets continue");
        let ch = l.chat_entry(&e, 2);
        assert_eq!(ch["token"], "i");
        assert_eq!(ch["bytes"], json!([105]));
        assert_eq!(ch["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(ch["top_logprobs"][0]["logprob"], ch["logprob"]);
        assert_eq!(l.chat_entry(&e, 0)["top_logprobs"], json!([]));
    }
}
