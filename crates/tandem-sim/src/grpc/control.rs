//! `vllm.Control`: discovery and `Abort`. The generated trait has no default methods, so every
//! RPC is here; those the simulator has no counterpart for (LoRA, shutdown, RL weight updates,
//! pause and sleep) answer `UNIMPLEMENTED`, as Dynamo's mocker does.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vllm_proto as pb;

use super::GrpcState;

/// vLLM's `GRPC_API_VERSION`.
const API_VERSION: &str = "vllm";

#[derive(Debug)]
pub(crate) struct ControlSvc {
    state: Arc<GrpcState>,
}

impl ControlSvc {
    pub(crate) fn new(state: Arc<GrpcState>) -> Self {
        ControlSvc { state }
    }

    fn server_info(&self) -> pb::ServerInfo {
        let (app, info) = (&self.state.app.info, &self.state.info);
        pb::ServerInfo {
            engine_version: crate::VLLM_VERSION.to_string(),
            api_version: API_VERSION.to_string(),
            instance_id: self.state.instance_id.clone(),
            // One engine: TP as profiled, no PP, DP or DCP.
            parallelism: Some(pb::ParallelismInfo {
                tensor_parallel_size: app.tp_size,
                pipeline_parallel_size: 1,
                data_parallel_size: 1,
                data_parallel_rank: 0,
                decode_context_parallel_size: 1,
                world_size: u64::from(app.tp_size),
                data_parallel_size_local: 1,
            }),
            max_model_len: app.max_model_len,
            kv_block_size: info.block_size,
            total_kv_blocks: u64::from(info.num_gpu_blocks),
            max_running_requests: info.max_num_seqs as u64,
            max_batched_tokens: info.max_num_batched_tokens as u64,
            max_loras: 0,
            rl_capabilities: Some(pb::RlCapabilities::default()),
            proto_version: pb::VERSION.to_string(),
            // Every layer is full attention.
            effective_attention_block_size: Some(u64::from(info.block_size)),
        }
    }

    fn model_info(&self) -> pb::ModelInfo {
        pb::ModelInfo {
            model_id: self.state.info.model_id.clone(),
            served_model_name: self.state.app.info.served_model_name.clone(),
            served_model_aliases: Vec::new(),
            supports_text_input: true,
            supports_token_ids_input: true,
            supports_lora: false,
            supports_multimodal: false,
            reasoning_parser: String::new(),
            tool_call_parser: String::new(),
        }
    }

    fn kv_event_sources(&self) -> pb::GetKvEventSourcesResponse {
        let sources = self
            .state
            .info
            .kv_events
            .iter()
            .map(|k| pb::KvEventSource {
                transport: "zmq".into(),
                // The bound endpoint: with port 0 the configured one names no port.
                endpoint: k.endpoint.clone(),
                topic: k.topic.clone(),
                replay_endpoint: k.replay_endpoint.clone().unwrap_or_default(),
                data_parallel_rank: Some(k.data_parallel_rank.unwrap_or(0)),
                encoding: "msgpack".into(),
                schema_version: 1,
                buffer_steps: u32::try_from(k.buffer_steps).unwrap_or(u32::MAX),
                // vLLM's `KVEventsConfig` defaults; the simulator's publisher does not bound
                // them differently.
                hwm: 100_000,
                max_queue_size: 100_000,
            })
            .collect();
        pb::GetKvEventSourcesResponse { sources }
    }
}

fn unsupported<T>(rpc: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "vllm.Control/{rpc} is not supported by tandem-sim"
    )))
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlSvc {
    async fn get_server_info(
        &self,
        _: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        Ok(Response::new(self.server_info()))
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(self.model_info()))
    }

    /// External ids; unknown ones and an empty list are no-ops. Each request gets a local
    /// ABORTED output, then its engine request is aborted (its KV freed).
    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let ids = request.into_inner().request_ids;
        let n = self.state.live.abort(&ids);
        tracing::debug!(requested = ids.len(), aborted = n, "gRPC abort");
        Ok(Response::new(pb::AbortResponse {}))
    }

    async fn get_kv_event_sources(
        &self,
        _: Request<pb::GetKvEventSourcesRequest>,
    ) -> Result<Response<pb::GetKvEventSourcesResponse>, Status> {
        Ok(Response::new(self.kv_event_sources()))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        unsupported("Shutdown")
    }

    async fn load_lora(
        &self,
        _: Request<pb::LoadLoraRequest>,
    ) -> Result<Response<pb::LoadLoraResponse>, Status> {
        unsupported("LoadLora")
    }

    async fn unload_lora(
        &self,
        _: Request<pb::UnloadLoraRequest>,
    ) -> Result<Response<pb::UnloadLoraResponse>, Status> {
        unsupported("UnloadLora")
    }

    async fn list_loras(
        &self,
        _: Request<pb::ListLorasRequest>,
    ) -> Result<Response<pb::ListLorasResponse>, Status> {
        unsupported("ListLoras")
    }

    async fn pause_generation(
        &self,
        _: Request<pb::PauseGenerationRequest>,
    ) -> Result<Response<pb::PauseGenerationResponse>, Status> {
        unsupported("PauseGeneration")
    }

    async fn resume_generation(
        &self,
        _: Request<pb::ResumeGenerationRequest>,
    ) -> Result<Response<pb::ResumeGenerationResponse>, Status> {
        unsupported("ResumeGeneration")
    }

    async fn is_paused(
        &self,
        _: Request<pb::IsPausedRequest>,
    ) -> Result<Response<pb::IsPausedResponse>, Status> {
        unsupported("IsPaused")
    }

    async fn sleep(
        &self,
        _: Request<pb::SleepRequest>,
    ) -> Result<Response<pb::SleepResponse>, Status> {
        unsupported("Sleep")
    }

    async fn wake_up(
        &self,
        _: Request<pb::WakeUpRequest>,
    ) -> Result<Response<pb::WakeUpResponse>, Status> {
        unsupported("WakeUp")
    }

    async fn is_sleeping(
        &self,
        _: Request<pb::IsSleepingRequest>,
    ) -> Result<Response<pb::IsSleepingResponse>, Status> {
        unsupported("IsSleeping")
    }

    async fn init_weight_transfer_engine(
        &self,
        _: Request<pb::InitWeightTransferEngineRequest>,
    ) -> Result<Response<pb::InitWeightTransferEngineResponse>, Status> {
        unsupported("InitWeightTransferEngine")
    }

    async fn start_weight_update(
        &self,
        _: Request<pb::StartWeightUpdateRequest>,
    ) -> Result<Response<pb::StartWeightUpdateResponse>, Status> {
        unsupported("StartWeightUpdate")
    }

    async fn start_draft_weight_update(
        &self,
        _: Request<pb::StartDraftWeightUpdateRequest>,
    ) -> Result<Response<pb::StartDraftWeightUpdateResponse>, Status> {
        unsupported("StartDraftWeightUpdate")
    }

    async fn update_weights(
        &self,
        _: Request<pb::UpdateWeightsRequest>,
    ) -> Result<Response<pb::UpdateWeightsResponse>, Status> {
        unsupported("UpdateWeights")
    }

    async fn finish_weight_update(
        &self,
        _: Request<pb::FinishWeightUpdateRequest>,
    ) -> Result<Response<pb::FinishWeightUpdateResponse>, Status> {
        unsupported("FinishWeightUpdate")
    }

    async fn update_weight_version(
        &self,
        _: Request<pb::UpdateWeightVersionRequest>,
    ) -> Result<Response<pb::UpdateWeightVersionResponse>, Status> {
        unsupported("UpdateWeightVersion")
    }

    async fn get_weight_version(
        &self,
        _: Request<pb::GetWeightVersionRequest>,
    ) -> Result<Response<pb::GetWeightVersionResponse>, Status> {
        unsupported("GetWeightVersion")
    }
}
