//! Whether to split a request into prefill and decode legs or run it whole on a decode engine.

use crate::snapshot::EngineView;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisaggMode {
    Always,
    Conditional,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DisaggSettings {
    pub mode: DisaggMode,
    /// Refuse (error) rather than fall back to local prefill when disaggregation was wanted.
    pub enforce: bool,
    /// Conditional: prompts with fewer uncached tokens than this run locally. A short prefill
    /// costs the decode engine less than the KV round trip costs the request.
    pub local_max_uncached_tokens: u64,
    /// Conditional: run locally when every prefill engine has more queued prefill tokens than
    /// this, since waiting behind that queue costs more than one local prefill.
    pub local_when_prefill_queue_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisaggDecision {
    Disaggregate,
    Local,
}

impl DisaggDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            DisaggDecision::Disaggregate => "disaggregate",
            DisaggDecision::Local => "local",
        }
    }
}

/// Why. A bounded set: these are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisaggReason {
    ModeAlways,
    ModeNever,
    LongPrompt,
    ShortPrompt,
    PrefillQueuePressure,
    NoPrefillEngine,
    /// A prefill leg ran and returned no KV handoff (e.g. it stopped on EOS).
    NullParams,
    /// Every prefill attempt failed.
    PrefillFailed,
    /// The prefill engine refused the prefill leg (a 4xx): the decode engine answers the
    /// client's own request instead, so its error names what the client sent (the prefill leg
    /// asks for one token, which the engine's message would quote).
    PrefillRejected,
}

impl DisaggReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisaggReason::ModeAlways => "mode_always",
            DisaggReason::ModeNever => "mode_never",
            DisaggReason::LongPrompt => "long_prompt",
            DisaggReason::ShortPrompt => "short_prompt",
            DisaggReason::PrefillQueuePressure => "prefill_queue_pressure",
            DisaggReason::NoPrefillEngine => "no_prefill_engine",
            DisaggReason::NullParams => "null_params",
            DisaggReason::PrefillFailed => "prefill_failed",
            DisaggReason::PrefillRejected => "prefill_rejected",
        }
    }

    /// Whether running locally for this reason is a fallback that `enforce` forbids.
    pub fn is_fallback(self) -> bool {
        matches!(
            self,
            DisaggReason::NoPrefillEngine | DisaggReason::NullParams | DisaggReason::PrefillFailed
        )
    }
}

/// Decide for one request. `prefill` are the routable prefill candidates.
pub fn decide(
    s: &DisaggSettings,
    uncached_tokens: u64,
    prefill: &[&EngineView],
) -> (DisaggDecision, DisaggReason) {
    use DisaggDecision::*;
    match s.mode {
        DisaggMode::Never => (Local, DisaggReason::ModeNever),
        _ if prefill.is_empty() => (Local, DisaggReason::NoPrefillEngine),
        DisaggMode::Always => (Disaggregate, DisaggReason::ModeAlways),
        DisaggMode::Conditional => {
            if uncached_tokens < s.local_max_uncached_tokens {
                (Local, DisaggReason::ShortPrompt)
            } else if prefill
                .iter()
                .all(|e| e.queued_prefill_tokens > s.local_when_prefill_queue_tokens)
            {
                (Local, DisaggReason::PrefillQueuePressure)
            } else {
                (Disaggregate, DisaggReason::LongPrompt)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(queued: u64) -> EngineView {
        EngineView {
            queued_prefill_tokens: queued,
            ..EngineView::healthy(0, "http://p")
        }
    }

    const S: DisaggSettings = DisaggSettings {
        mode: DisaggMode::Conditional,
        enforce: false,
        local_max_uncached_tokens: 256,
        local_when_prefill_queue_tokens: 16384,
    };

    #[test]
    fn conditional_thresholds() {
        let idle = p(0);
        let busy = p(20_000);
        use DisaggDecision::*;
        assert_eq!(
            decide(&S, 100, &[&idle]),
            (Local, DisaggReason::ShortPrompt)
        );
        assert_eq!(
            decide(&S, 256, &[&idle]),
            (Disaggregate, DisaggReason::LongPrompt)
        );
        assert_eq!(
            decide(&S, 4000, &[&busy]),
            (Local, DisaggReason::PrefillQueuePressure)
        );
        assert_eq!(
            decide(&S, 4000, &[&busy, &idle]),
            (Disaggregate, DisaggReason::LongPrompt)
        );
        assert_eq!(
            decide(&S, 4000, &[]),
            (Local, DisaggReason::NoPrefillEngine)
        );
    }

    #[test]
    fn modes_override_thresholds() {
        let idle = p(0);
        let always = DisaggSettings {
            mode: DisaggMode::Always,
            ..S
        };
        let never = DisaggSettings {
            mode: DisaggMode::Never,
            ..S
        };
        assert_eq!(decide(&always, 1, &[&idle]).0, DisaggDecision::Disaggregate);
        assert_eq!(decide(&never, 100_000, &[&idle]).1, DisaggReason::ModeNever);
        assert!(DisaggReason::NoPrefillEngine.is_fallback());
        assert!(!DisaggReason::ShortPrompt.is_fallback());
    }
}
