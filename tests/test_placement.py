"""GPU placement of a local generation pipeline: each teacher replica gets GPUs of its own, planned before it starts."""

import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.generation.placement import GpuDemand, plan_gpus, replica_of, take_gpus, visible_gpus

EIGHT = [str(i) for i in range(8)]


def test_two_tensor_parallel_engines_of_two_replicas_each_take_disjoint_gpus():
    plan = plan_gpus([GpuDemand("big", 2, 2, True), GpuDemand("other", 4, 1, True)], EIGHT)
    assert plan == {"big": ["0,1", "2,3"], "other": ["4,5,6,7"]}
    used = [gpu for replicas in plan.values() for one in replicas for gpu in one.split(",")]
    assert sorted(used) == EIGHT  # every GPU once: no engine shares one


def test_the_documented_tensor_parallel_4_times_2_replicas_on_8_gpus():
    assert plan_gpus([GpuDemand("llama-70b", 4, 2, True)], EIGHT) == {"llama-70b": ["0,1,2,3", "4,5,6,7"]}


def test_vllm_teachers_asking_more_gpus_than_there_are_fail_naming_each():
    with pytest.raises(ConfigError, match=r"need 10 GPUs .*a: 2 x 4, b: 1 x 2.* has 8 visible; lower replicas or "
                                          r"tensor_parallel_size, or run on a Ray cluster \(ray:\)$"):  # fmt: skip
        plan_gpus([GpuDemand("a", 4, 2, True), GpuDemand("b", 2, 1, True)], EIGHT)


def test_transformers_teachers_take_the_gpus_vllm_left_in_turn(caplog):
    with caplog.at_level("WARNING", logger="magpie_teach.generation.placement"):
        plan = plan_gpus([GpuDemand("v", 2, 1, True), GpuDemand("t1", 1, 2, False), GpuDemand("t2", 1, 2, False)],
                         ["0", "1", "2", "3", "4"])  # fmt: skip
    assert plan == {"v": ["0,1"], "t1": ["2", "3"], "t2": ["4", "2"]}
    assert not caplog.records  # GPUs were left for them: nothing to warn about


def test_transformers_teachers_share_every_gpu_when_vllm_took_them_all(caplog):
    with caplog.at_level("WARNING", logger="magpie_teach.generation.placement"):
        plan = plan_gpus([GpuDemand("v", 2, 1, True), GpuDemand("t", 1, 3, False)], ["0", "1"])
    assert plan == {"v": ["0,1"], "t": ["0", "1", "0"]}
    assert caplog.messages == ["the vLLM teachers take every GPU: the transformers teachers share them (0, 1)"]


def test_the_parents_own_cuda_visible_devices_are_the_ones_planned(monkeypatch):
    import torch

    from magpie_teach import modeling

    monkeypatch.setattr(modeling, "cuda_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,GPU-1f2e")
    assert visible_gpus() == ["4", "6", "GPU-1f2e"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1", "2"]
    monkeypatch.setattr(modeling, "cuda_visible", lambda: False)
    assert visible_gpus() == []


def test_a_replica_keeps_only_its_gpus_visible_and_says_which(monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert replica_of("generate_1-replica-1") == 1 and replica_of("my-replica-step-replica-12") == 12
    assert replica_of(None) == 0
    with caplog.at_level("INFO", logger="magpie_teach.generation.placement"):
        take_gpus(["0,1,2,3", "4,5,6,7"], "generate_1-replica-1")
        take_gpus(["2"], None)
    assert caplog.messages == ["generate_1-replica-1: on GPU(s) 4,5,6,7", "replica 0: on GPU(s) 2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    take_gpus(["0,1,2,3", "4,5,6,7"], "generate_1-replica-1")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    take_gpus(None, "generate_1-replica-0")  # no plan (CPU, Ray): left as it is
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_the_generate_config_plans_gpu_teachers_only(monkeypatch, tmp_path):
    from magpie_teach.generation import placement, run
    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, RayConfig, TeacherConfig

    teachers = [
        TeacherConfig(name="v", model="m", backend="vllm", tensor_parallel_size=2, replicas=2),
        TeacherConfig(name="t", model="m"),
        TeacherConfig(name="pinned", model="m", device="cuda:3"),  # the user's own choice: not planned
        TeacherConfig(name="api", model="m", backend="openai", base_url="http://127.0.0.1:1/v1"),
        TeacherConfig(name="cpu", model="m", device="cpu"),
    ]
    config = GenerateConfig(
        output_dir=str(tmp_path), instructions=InstructionsConfig(path="x.jsonl"), teachers=teachers
    )
    monkeypatch.setattr(
        "magpie_teach.modeling.resolve_device", lambda device="auto": "cpu" if device == "cpu" else "cuda"
    )
    monkeypatch.setattr(placement, "visible_gpus", lambda: ["0", "1", "2", "3", "4"])
    assert run.gpu_plan(config, teachers) == {"v": ["0,1", "2,3"], "t": ["4"]}
    config.ray = RayConfig()
    assert run.gpu_plan(config, teachers) == {}  # Ray places the actors


def _teachers():
    from magpie_teach.generation.config import TeacherConfig

    return [
        TeacherConfig(name="v", model="m", backend="vllm", tensor_parallel_size=4, replicas=2),
        TeacherConfig(name="t", model="m", replicas=3, tensor_parallel_size=2),  # vLLM's key: one GPU all the same
        TeacherConfig(name="api", model="m", backend="openai", base_url="http://127.0.0.1:1/v1"),
        TeacherConfig(name="cpu", model="m", device="cpu"),
    ]


def test_on_a_ray_cluster_auto_is_decided_by_the_clusters_gpus_not_the_drivers():
    from magpie_teach.generation.placement import devices_on_cluster

    assert devices_on_cluster(_teachers(), [8.0, 4.0]) == {"v": "cuda", "t": "cuda", "cpu": "cpu"}
    assert devices_on_cluster(_teachers(), [4.0, 4.0, 3.0])["v"] == "cuda"  # 11 GPUs, an engine's 4 on one node
    cpu_only = [t for t in _teachers() if t.backend != "vllm"]
    assert devices_on_cluster(cpu_only, [0.0, 0.0]) == {"t": "cpu", "cpu": "cpu"}


def test_on_a_ray_cluster_gpus_it_cannot_give_are_one_error_naming_the_teachers():
    from magpie_teach.generation.config import TeacherConfig
    from magpie_teach.generation.placement import devices_on_cluster

    with pytest.raises(ConfigError, match=r"need 11 GPUs at once \(v: 2 x 4, t: 3 x 1: .*cluster has 10: its actors "
                                          r"could never all start; lower replicas or tensor_parallel_size$"):  # fmt: skip
        devices_on_cluster(_teachers(), [8.0, 2.0])
    with pytest.raises(ConfigError, match=r"a replica of v needs 4 GPUs on one node, but the largest node .* has 3; "
                                          r"lower tensor_parallel_size$"):  # fmt: skip
        devices_on_cluster(_teachers(), [3.0, 3.0, 3.0, 3.0])
    with pytest.raises(ConfigError, match=r"teachers\[0\].device: cuda, but the Ray cluster has no GPU \(its 1 "
                                          r"node\(s\) offer none\); use auto or cpu, or add GPU nodes$"):  # fmt: skip
        devices_on_cluster([TeacherConfig(name="g", model="m", device="cuda")], [0.0])
    with pytest.raises(ConfigError, match=r"teachers\[1\].device: 'cuda:1': on a Ray cluster Ray chooses each "
                                          r"actor's GPUs; use cuda or auto$"):  # fmt: skip
        devices_on_cluster([TeacherConfig(name="c", model="m"), TeacherConfig(name="g", model="m", device="cuda:1")],
                           [8.0])  # fmt: skip


def test_a_ray_pipeline_asks_ray_for_each_gpu_teachers_gpus_in_the_clusters_dtype(monkeypatch, tmp_path, capsys):
    """Built against a cluster of GPUs from a driver without one: the transformers teacher's actors ask for one GPU
    each, the vLLM engine's for its tensor_parallel_size, both in bfloat16 (auto on a GPU)."""
    from magpie_teach.generation import run
    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, RayConfig, TeacherConfig

    teachers = [TeacherConfig(name="v", model="m", backend="vllm", tensor_parallel_size=2, replicas=2),
                TeacherConfig(name="t", model="m"), TeacherConfig(name="c", model="m", device="cpu")]  # fmt: skip
    config = GenerateConfig(output_dir=str(tmp_path), instructions=InstructionsConfig(path="x.jsonl"),
                            teachers=teachers, ray=RayConfig())  # fmt: skip
    instructions = __import__("pandas").DataFrame({"id": ["a", "b"], "instruction": ["x?", "y?"]})
    work = run.GeneratePlan(instructions, {}, {t.name: 2 for t in teachers}, {t.name: instructions for t in teachers})
    monkeypatch.setattr("magpie_teach.scoring.on_ray.cluster_gpus", lambda: [4.0, 4.0])
    pipeline, _ = run.build_pipeline(config, work)
    steps = {name: pipeline.dag.get_step(name)["step"] for name in pipeline.dag if name.startswith("generate_")}
    got = {name: (s.resources.replicas, s.resources.gpus, getattr(s.llm, "device", None),
                  str(getattr(s.llm, "torch_dtype", getattr(s.llm, "dtype", None)))) for name, s in steps.items()}  # fmt: skip
    assert got == {"generate_0": (2, 2, None, "bfloat16"), "generate_1": (1, 1, "cuda", "bfloat16"),
                   "generate_2": (1, None, "cpu", "float32")}  # fmt: skip
    said = capsys.readouterr().err.splitlines()  # where each teacher runs, said before it loads
    assert said == ["teacher v (m, vllm, bfloat16): on the Ray cluster, 2 GPU(s) per replica, 2 replicas",
                    "teacher t (m, transformers, bfloat16): on the Ray cluster, 1 GPU(s) per replica",
                    "teacher c (m, transformers, float32): on the Ray cluster's CPUs"]  # fmt: skip


def test_each_teacher_says_where_it_runs_and_in_which_dtype_before_it_loads(monkeypatch, tmp_path, capsys):
    from magpie_teach.generation import placement, run
    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, TeacherConfig

    teachers = [TeacherConfig(name="v", model="m", backend="vllm", tensor_parallel_size=2, replicas=2),
                TeacherConfig(name="t", model="m"), TeacherConfig(name="c", model="m", device="cpu", replicas=2),
                TeacherConfig(name="api", model="gpt", backend="openai", base_url="http://127.0.0.1:1/v1")]  # fmt: skip
    config = GenerateConfig(output_dir=str(tmp_path), instructions=InstructionsConfig(path="x.jsonl"),
                            teachers=teachers)  # fmt: skip
    instructions = __import__("pandas").DataFrame({"id": ["a"], "instruction": ["x?"]})
    work = run.GeneratePlan(instructions, {}, {t.name: 1 for t in teachers}, {t.name: instructions for t in teachers})
    monkeypatch.setattr("magpie_teach.modeling.cuda_visible", lambda: True)
    monkeypatch.setattr(placement, "visible_gpus", lambda: ["0", "1", "2", "3", "4"])
    run.build_pipeline(config, work)
    assert capsys.readouterr().err.splitlines() == [
        "teacher v (m, vllm, bfloat16): replica 0 on GPU(s) 0,1, replica 1 on GPU(s) 2,3",
        "teacher t (m, transformers, bfloat16): replica 0 on GPU(s) 4",
        "teacher c (m, transformers, float32): on cpu, 2 replicas",
        "teacher api (gpt, openai): at http://127.0.0.1:1/v1",
    ]


def test_ray_scoring_actors_the_cluster_cannot_place_are_an_error_and_idle_gpus_a_warning(caplog):
    from magpie_teach.scoring.on_ray import check_gpus

    check_gpus([4.0, 4.0], 1, 8, "h:1")  # fits exactly
    check_gpus([0.0], 0, 8, "h:1")  # a CPU cluster, a CPU run: nothing to say
    with pytest.raises(ConfigError, match=r"asks 9 GPU\(s\), but the Ray cluster at h:1 has 8: .*num-workers to 8"):
        check_gpus([4.0, 4.0], 1, 9, "h:1")
    with pytest.raises(ConfigError, match=r"--gpus-per-worker 2: no node .* has that many GPUs \(the largest has 1\)"):
        check_gpus([1.0] * 8, 2, 2, "h:1")  # 8 GPUs in all, but never 2 on one node
    assert not caplog.records
    with caplog.at_level("WARNING", logger="magpie_teach.scoring.on_ray"):
        check_gpus([8.0], 0, 4, "h:1")
    assert "has 8 GPU(s) but --gpus-per-worker 0 scores on its CPUs" in caplog.text


def test_magpies_model_runs_in_the_devices_dtype_not_the_checkpoints(monkeypatch):
    """distilabel's own ``auto`` is the checkpoint's dtype: a bfloat16 checkpoint would generate in bfloat16 on a CPU
    (slow there) and a float32 one in float32 on a GPU (several times slower, twice the memory)."""
    from magpie_teach.generation import run
    from magpie_teach.generation.config import MagpieConfig

    assert run.magpie_llm(MagpieConfig(model="m", device="cpu")).torch_dtype == "float32"
    assert run.magpie_llm(MagpieConfig(model="m", device="cpu", dtype="bfloat16")).torch_dtype == "bfloat16"
    monkeypatch.setattr("magpie_teach.modeling.cuda_visible", lambda: True)
    llm = run.magpie_llm(MagpieConfig(model="m"))
    assert (llm.device, llm.torch_dtype) == ("cuda", "bfloat16")
