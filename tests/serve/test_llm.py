"""vLLM generators and judges through Ray Serve LLM (vlit/serve/llm.py), on CPU: the
LLMConfig made from a generator's config, and the application `build_app` makes with
LLMServer deployments behind the pool, built by Ray's own `build_llm_deployment` with
vLLM's Python layer (`make setup` installs it beside the venv) and no engine started."""
from __future__ import annotations

import json
import textwrap

import pytest

from support import vllm_python
from vlit.config import ConfigError, DeploymentConfig, ServeConfig, VLLMBackendConfig, load_config
from vlit.serve import llm

SERVE = {
    "generators": {"llava": {"backend": {"kind": "vllm", "model": {"preset": None, "path": "s3://models/llava-1.5-7b-hf",
                                                                     "max_len": 4096, "dtype": "bfloat16"},
                                         "tensor_parallel_size": 2},
                             "deployment": {"num_replicas": 3, "num_cpus": 4, "num_gpus": 2,
                                            "max_ongoing_requests": 128, "batch": {"max_batch_size": 64}}}},
    "judges": {"rater": {"backend": {"kind": "vllm", "model": {"preset": None, "path": "/models/judge"},
                                     "max_model_len": 2048}}},
}


def test_llm_config_from_the_generator_config():
    gen = ServeConfig.model_validate(SERVE).generators["llava"]
    config = llm.llm_config("generator-llava", gen.backend, gen.deployment)
    assert config["model_loading_config"] == {"model_id": "generator-llava",
                                              "model_source": {"bucket_uri": "s3://models/llava-1.5-7b-hf"}}
    assert config["engine_kwargs"] == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "max_model_len": 4096,
                                       "dtype": "bfloat16", "limit_mm_per_prompt": {"image": 1}}
    assert config["deployment_config"]["num_replicas"] == 3 and config["deployment_config"]["max_ongoing_requests"] == 128
    judge = ServeConfig.model_validate(SERVE).judges["rater"]
    local = llm.llm_config("judge-rater", judge.backend, judge.deployment)
    assert local["model_loading_config"]["model_source"] == "/models/judge"
    assert local["engine_kwargs"]["max_model_len"] == 2048
    # The caller in front of an engine holds no GPU and one replica.
    front = llm.front(gen.deployment)
    assert (front.num_replicas, front.num_gpus) == (1, 0.0) and front.max_ongoing_requests == 128


def test_vllm_needs_a_checkpoint_and_the_engines_gpus(tmp_path):
    with pytest.raises(ValueError, match="set model.path"):
        VLLMBackendConfig(kind="vllm", model={"preset": "tiny"})
    bad = json.loads(json.dumps(SERVE))
    bad["generators"]["llava"]["deployment"]["num_gpus"] = 1
    (tmp_path / "serve.yaml").write_text(json.dumps({"serve": bad}))
    with pytest.raises(ConfigError, match="serve.generators.llava: .*a vllm engine replica takes backend.tensor_parallel_size"):
        load_config(str(tmp_path / "serve.yaml"))
    assert DeploymentConfig().num_gpus == 0  # 0 is fine: the engine's bundles say the GPUs


BUILD = textwrap.dedent("""
    import json, sys
    import ray
    from vlit.config import ServeConfig
    from vlit.serve.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[-1])
    app = build_app(ServeConfig.model_validate(json.loads(sys.argv[1])))
    router = app._bound_deployment
    out = {}
    for pool, arg in (("generators", 1), ("judges", 2)):
        for name, bound in router.init_args[arg].items():
            front = bound._bound_deployment
            engine = front.init_args[2]._bound_deployment
            config = engine.init_kwargs["llm_config"]
            out[name] = {"front": [front.name, front.num_replicas, front.ray_actor_options],
                         "engine": [engine.name, engine.num_replicas, engine.max_ongoing_requests,
                                    engine._replica_config.placement_group_bundles, type(config).__module__],
                         "model": config.model_loading_config.model_dump(), "engine_kwargs": config.engine_kwargs}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.timeout(180)
def test_build_app_puts_ray_serve_llm_engines_behind_the_pool():
    stdout = vllm_python.run_python(BUILD, json.dumps(SERVE))
    out = json.loads(stdout.split("RESULT ", 1)[1])
    llava, rater = out["llava"], out["rater"]
    # The pool's deployment forwards; the engine is Ray Serve LLM's LLMServer, with one
    # placement group per replica: the replica and tensor_parallel_size GPU workers.
    assert llava["front"] == ["generator-llava", 1, {"num_cpus": 0.25, "num_gpus": 0.0}]
    name, replicas, ongoing, bundles, module = llava["engine"]
    assert (name, replicas, ongoing, module) == ("llm:generator-llava", 3, 128, "ray.serve.llm")
    assert bundles == [{"CPU": 4.0, "GPU": 1}, {"GPU": 1}]
    assert llava["model"]["model_id"] == "generator-llava"
    assert llava["model"]["model_source"]["bucket_uri"] == "s3://models/llava-1.5-7b-hf"
    assert llava["engine_kwargs"]["tensor_parallel_size"] == 2 and llava["engine_kwargs"]["dtype"] == "bfloat16"
    assert rater["front"][0] == "judge-rater" and rater["engine"][0] == "llm:judge-rater"
    assert rater["model"]["model_source"] == "/models/judge" and rater["engine"][3] == [{"CPU": 1.0, "GPU": 1}]
