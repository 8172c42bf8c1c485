"""vLLM generators and judges through Ray Serve LLM (`ray.serve.llm`).

For `backend.kind: vllm` the model runs in an `LLMServer` deployment, built here from
the generator's or judge's config by `build_llm_deployment`: vLLM's engine batches every
request in flight continuously, and takes images as OpenAI chat `image_url` parts,
formatted by the checkpoint's own chat template. The pool's Generator and Judge
deployments stay in front of it (`backends.llm.LLMServerBackend`), so requests are
validated, images read under `serve.images`, and the judge rubric applied exactly as for
every other backend; they only forward chat requests to the engine.

    serve.generators.NAME.deployment  -> the LLMServer deployment (replicas, queue bounds,
                                         health checks); each replica holds one engine of
                                         backend.tensor_parallel_size GPUs
    the Generator/Judge in front      -> one small CPU replica (it only waits on the engine)

`ray.serve.llm` imports vLLM, so this module imports it only when a deployment is built
(the GPU serving image: cluster/Dockerfile's `serve` target, ray[llm]==2.60.0).
"""
from __future__ import annotations

from vlit import storage
from vlit.config import DeploymentConfig, VLLMBackendConfig

# The caller in front of an engine does no model work.
FRONT = {"num_replicas": 1, "num_cpus": 0.25, "num_gpus": 0.0}


def model_id(kind: str, name: str) -> str:
    """The engine's model id (and deployment name): one LLMServer per generator or judge."""
    return f"{kind}-{name}"


def llm_config(model: str, backend: VLLMBackendConfig, deployment: DeploymentConfig) -> dict:
    """The `ray.serve.llm.LLMConfig` of one engine, as keyword arguments."""
    path = backend.model.path
    source = {"bucket_uri": storage.normalize(path)} if storage.is_s3(path) else storage.normalize(path)
    return {
        "model_loading_config": {"model_id": model, "model_source": source},
        "engine_kwargs": {
            "tensor_parallel_size": backend.tensor_parallel_size,
            "gpu_memory_utilization": backend.gpu_memory_utilization,
            "dtype": backend.model.dtype,
            "limit_mm_per_prompt": {"image": 1},  # the pool's requests carry one image at most
            # None of both: vLLM takes the checkpoint's own context length.
            **({"max_model_len": m} if (m := backend.max_model_len or backend.model.max_len) else {}),
        },
        "deployment_config": {
            "num_replicas": deployment.num_replicas,
            "max_ongoing_requests": deployment.max_ongoing_requests,
            "max_queued_requests": deployment.max_queued_requests,
            "health_check_period_s": deployment.health_check_period_s,
            "health_check_timeout_s": deployment.health_check_timeout_s,
            "ray_actor_options": {"num_cpus": deployment.num_cpus},
        },
        "log_engine_metrics": False,
    }


def serve_llm():
    """`ray.serve.llm`, or an ImportError that says what to install: it imports vLLM."""
    try:
        import ray.serve.llm
        import ray.serve.llm.openai_api_models  # noqa: F401 - the chat request the backend sends
    except ImportError as e:
        raise ImportError(f"the vllm backend needs the `vllm` package, which is not installed ({e}); it is in "
                          "the GPU serving image (ray[llm]==2.60.0, vllm==0.29.0: cluster/Dockerfile), or "
                          "choose the hf backend") from e
    return ray.serve.llm


def llm_deployment(model: str, backend: VLLMBackendConfig, deployment: DeploymentConfig):
    """The bound LLMServer deployment (`ray.serve.llm.build_llm_deployment`) of one engine."""
    llm = serve_llm()
    return llm.build_llm_deployment(llm.LLMConfig(**llm_config(model, backend, deployment)), name_prefix="llm:")


def front(deployment: DeploymentConfig) -> DeploymentConfig:
    """The deployment settings of the Generator or Judge in front of an engine."""
    return deployment.model_copy(update=FRONT)
