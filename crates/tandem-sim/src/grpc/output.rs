//! Engine events → `GenerateResponse` messages, in vLLM's order (vllm-grpc.md §3): `PromptInfo`
//! alone when the first engine output arrives, then one `SequenceOutput` per engine output (text
//! possibly empty), the last carrying `FinishInfo`. Pure; the streaming and the unary RPC both
//! drive one [`Assembler`].

use std::sync::Arc;

use serde_json::Value;
use vllm_proto::finish_info::{FinishReason as PbFinish, StopReason};
use vllm_proto::{FinishInfo, GenerateResponse, PromptInfo, SequenceOutput};

use super::convert::{json_to_struct, kv_params, KvIdentity, ResponseOpts};
use crate::engine::Finish;
use crate::scheduler::FinishReason;

/// One request's response state.
#[derive(Debug)]
pub(crate) struct Assembler {
    opts: ResponseOpts,
    prompt: Arc<[u32]>,
    identity: KvIdentity,
    prompt_sent: bool,
    /// Everything so far, for the unary response.
    text: String,
    tokens: Vec<u32>,
    finish: Option<FinishInfo>,
}

impl Assembler {
    pub(crate) fn new(opts: ResponseOpts, prompt: Arc<[u32]>, identity: KvIdentity) -> Self {
        Assembler {
            opts,
            prompt,
            identity,
            prompt_sent: false,
            text: String::new(),
            tokens: Vec::new(),
            finish: None,
        }
    }

    /// Tokens output so far.
    pub(crate) fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn finished(&self) -> bool {
        self.finish.is_some()
    }

    fn prompt_info(&self) -> PromptInfo {
        PromptInfo {
            num_prompt_tokens: self.prompt.len() as u32,
            token_ids: if self.opts.prompt_token_ids {
                self.prompt.to_vec()
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    /// `PromptInfo`, if it has not gone out yet: it precedes the first output, whatever that is.
    fn take_prompt(&mut self, out: &mut Vec<GenerateResponse>) {
        if !self.prompt_sent {
            self.prompt_sent = true;
            out.push(GenerateResponse {
                prompt_info: Some(self.prompt_info()),
                outputs: None,
            });
        }
    }

    fn chunk(&self, text: &str, tokens: &[u32], finish: Option<FinishInfo>) -> SequenceOutput {
        SequenceOutput {
            index: 0,
            text: if self.opts.output_text {
                text.to_string()
            } else {
                String::new()
            },
            num_tokens: tokens.len() as u32,
            token_ids: if self.opts.output_token_ids {
                tokens.to_vec()
            } else {
                Vec::new()
            },
            finish_info: finish,
            ..Default::default()
        }
    }

    /// One sampled token (one engine output): the messages to send.
    pub(crate) fn token(
        &mut self,
        token: u32,
        text: &str,
        finish: Option<&Finish>,
    ) -> Vec<GenerateResponse> {
        let mut out = Vec::with_capacity(2);
        self.take_prompt(&mut out);
        self.text.push_str(text);
        self.tokens.push(token);
        let info = finish.map(|f| self.finish_info(f));
        self.finish = info.clone();
        out.push(GenerateResponse {
            prompt_info: None,
            outputs: Some(self.chunk(text, &[token], info)),
        });
        out
    }

    /// `Control.Abort`: vLLM's frontend pushes a local terminal output (no tokens, ABORTED) onto
    /// the stream before it aborts the engine request.
    pub(crate) fn abort(&mut self) -> Vec<GenerateResponse> {
        let mut out = Vec::with_capacity(2);
        self.take_prompt(&mut out);
        let info = FinishInfo {
            num_output_tokens: self.tokens.len() as u32,
            finish_reason: PbFinish::Aborted as i32,
            ..Default::default()
        };
        self.finish = Some(info.clone());
        out.push(GenerateResponse {
            prompt_info: None,
            outputs: Some(self.chunk("", &[], Some(info))),
        });
        out
    }

    fn finish_info(&self, f: &Finish) -> FinishInfo {
        let (reason, stop) = match f.reason {
            FinishReason::Stop => {
                let stop = match &f.stop_reason {
                    Some(Value::String(s)) => Some(StopReason::StopString(s.clone())),
                    Some(v) => v
                        .as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .map(StopReason::StopTokenId),
                    // EOS: the engine names no reason; the matched token is the last one.
                    None => self.tokens.last().copied().map(StopReason::EosTokenId),
                };
                (PbFinish::Stop, stop)
            }
            FinishReason::Length => (PbFinish::Length, None),
            FinishReason::Abort | FinishReason::Error => (PbFinish::Aborted, None),
        };
        FinishInfo {
            num_output_tokens: self.tokens.len() as u32,
            finish_reason: reason as i32,
            stop_reason: stop,
            kv_transfer_params: f
                .kv
                .as_ref()
                .and_then(|kv| json_to_struct(&kv_params(&self.identity, kv))),
            ec_transfer_params: None,
            num_cached_tokens: Some(f.cached_tokens as u32),
        }
    }

    /// The unary answer: `PromptInfo` and every output aggregated, with the finish.
    pub(crate) fn unary(&self) -> GenerateResponse {
        GenerateResponse {
            prompt_info: Some(self.prompt_info()),
            outputs: Some(self.chunk(&self.text, &self.tokens, self.finish.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::KvHandle;

    fn asm(opts: ResponseOpts) -> Assembler {
        Assembler::new(
            opts,
            Arc::from(vec![1u32, 2, 3]),
            KvIdentity {
                engine_id: "e".into(),
                host: "h".into(),
                port: 9,
                tp_size: 1,
            },
        )
    }

    const TEXT: ResponseOpts = ResponseOpts {
        prompt_token_ids: false,
        output_text: true,
        output_token_ids: false,
    };

    fn fin(reason: FinishReason, stop: Option<Value>) -> Finish {
        Finish {
            reason,
            stop_reason: stop,
            kv: None,
            cached_tokens: 16,
        }
    }

    #[test]
    fn prompt_info_comes_alone_then_one_chunk_per_output() {
        let mut a = asm(TEXT);
        let first = a.token(10, "a", None);
        assert_eq!(first.len(), 2);
        let p = first[0].prompt_info.as_ref().unwrap();
        assert_eq!(p.num_prompt_tokens, 3);
        assert!(p.token_ids.is_empty(), "prompt ids only on request");
        assert!(first[0].outputs.is_none());
        let o = first[1].outputs.as_ref().unwrap();
        assert_eq!((o.text.as_str(), o.num_tokens), ("a", 1));
        assert!(o.token_ids.is_empty(), "token ids only on request");
        assert!(o.finish_info.is_none());
        // Empty text still makes a chunk.
        let second = a.token(11, "", None);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].outputs.as_ref().unwrap().num_tokens, 1);
        let last = a.token(12, "c", Some(&fin(FinishReason::Length, None)));
        let f = last[0]
            .outputs
            .as_ref()
            .unwrap()
            .finish_info
            .clone()
            .unwrap();
        assert_eq!(f.finish_reason, PbFinish::Length as i32);
        assert_eq!(f.num_output_tokens, 3, "cumulative");
        assert_eq!(f.num_cached_tokens, Some(16));
        assert!(f.kv_transfer_params.is_none());
        let u = a.unary();
        let o = u.outputs.unwrap();
        assert_eq!((o.text.as_str(), o.num_tokens), ("ac", 3));
        assert_eq!(o.finish_info.unwrap().num_output_tokens, 3);
    }

    #[test]
    fn stop_reasons() {
        let opts = ResponseOpts {
            output_token_ids: true,
            prompt_token_ids: true,
            ..TEXT
        };
        let mut a = asm(opts);
        let m = a.token(7, "", Some(&fin(FinishReason::Stop, None)));
        assert_eq!(m[0].prompt_info.as_ref().unwrap().token_ids, vec![1, 2, 3]);
        let o = m[1].outputs.as_ref().unwrap();
        assert_eq!(o.token_ids, vec![7], "the EOS token stays in token_ids");
        assert_eq!(
            o.finish_info.as_ref().unwrap().stop_reason,
            Some(StopReason::EosTokenId(7))
        );
        let mut a = asm(TEXT);
        let m = a.token(
            7,
            "",
            Some(&fin(FinishReason::Stop, Some(Value::from(7u32)))),
        );
        assert_eq!(
            m[1].outputs
                .as_ref()
                .unwrap()
                .finish_info
                .as_ref()
                .unwrap()
                .stop_reason,
            Some(StopReason::StopTokenId(7))
        );
        let mut a = asm(TEXT);
        let m = a.token(
            7,
            "x",
            Some(&fin(FinishReason::Stop, Some(Value::from("END")))),
        );
        assert_eq!(
            m[1].outputs
                .as_ref()
                .unwrap()
                .finish_info
                .as_ref()
                .unwrap()
                .stop_reason,
            Some(StopReason::StopString("END".into()))
        );
    }

    #[test]
    fn abort_before_any_output_still_sends_prompt_info_first() {
        let mut a = asm(TEXT);
        let m = a.abort();
        assert_eq!(m.len(), 2);
        assert!(m[0].prompt_info.is_some());
        let f = m[1].outputs.as_ref().unwrap().finish_info.clone().unwrap();
        assert_eq!(f.finish_reason, PbFinish::Aborted as i32);
        assert_eq!(f.num_output_tokens, 0);
        assert!(a.finished());
    }

    #[test]
    fn prefill_finish_carries_the_kv_params() {
        let mut a = asm(TEXT);
        let mut f = fin(FinishReason::Length, None);
        f.kv = Some(KvHandle {
            block_ids: vec![1],
            remote_request_id: "r-1".into(),
            num_tokens: 3,
        });
        let m = a.token(5, "z", Some(&f));
        let kv = m[1].outputs.as_ref().unwrap().finish_info.clone().unwrap();
        let kv = super::super::convert::struct_to_json(&kv.kv_transfer_params.unwrap());
        assert_eq!(kv["remote_engine_id"], "e");
        assert_eq!(kv["remote_port"], 9.0);
        assert_eq!(kv["do_remote_prefill"], true);
    }

    #[test]
    fn output_text_off_blanks_text_but_counts_tokens() {
        let mut a = asm(ResponseOpts {
            output_text: false,
            ..TEXT
        });
        let m = a.token(5, "z", None);
        let o = m[1].outputs.as_ref().unwrap();
        assert_eq!((o.text.as_str(), o.num_tokens), ("", 1));
    }
}
