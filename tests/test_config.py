import dataclasses
import json

import pytest

from cory.cli import main
from cory.config import (CHOICES, AlgoConfig, Config, KLConfig, LoraConfig, algorithm_defaults, check, field_docs, load_config,
                         valid_keys)
from cory.errors import UsageError


def test_defaults_load_and_are_typed():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.iterations == 100 and cfg.algo.name == "reinforce"


def test_yaml_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  iterations: 7\n  seed: 3\nmodel:\n  name: cory:micro-reviews\n")
    cfg = load_config(f, ["train.iterations=9", "algo.lr=0.5"])
    assert (cfg.train.iterations, cfg.train.seed, cfg.model.name, cfg.algo.lr) == (9, 3, "cory:micro-reviews", 0.5)


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(UsageError) as e:
        load_config(None, ["train.iteratons=3"])
    msg = str(e.value)
    assert "train.iteratons" in msg and "iterations" in msg and "\n" not in msg


def test_unknown_section():
    with pytest.raises(UsageError, match="unknown config section 'trian'"):
        load_config(None, ["trian.iterations=3"])


def test_wrong_type_is_one_line():
    with pytest.raises(UsageError) as e:
        load_config(None, ["train.iterations=many"])
    assert "train.iterations" in str(e.value) and "\n" not in str(e.value)


def test_bad_choice_lists_choices():
    with pytest.raises(UsageError, match="k1, k2, k3, full"):
        load_config(None, ["kl.estimator=k9"])
    with pytest.raises(UsageError, match="reinforce"):
        load_config(None, ["algo.name=nope"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_with_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  learning_rate: 0.1\n")
    with pytest.raises(UsageError, match="algo.learning_rate.*valid keys in 'algo'.*lr"):
        load_config(f)


def test_every_field_is_documented():
    docs = field_docs()
    missing = [k for k in valid_keys() if not docs.get(k)]
    assert not missing, missing


@pytest.mark.parametrize("key,value", [("vllm_dtype", "bfloat16"), ("vllm_kv_cache_gib", "1.0"),
                                       ("vllm_gpu_memory_utilization", "0.5"), ("vllm_sleep", "false")])
def test_vllm_keys_are_refused_without_the_vllm_backend(key, value):
    with pytest.raises(UsageError, match=f"generation.{key} only act with generation.backend=vllm"):
        load_config(None, [f"generation.{key}={value}"])
    load_config(None, ["generation.backend=vllm", f"generation.{key}={value}"])  # accepted where it acts


def test_per_token_sampling_controls_need_a_backend_that_applies_logits_hooks():
    from cory.generation import BACKENDS

    assert BACKENDS["native"].token_hooks and not BACKENDS["vllm"].token_hooks
    for control in ("kl.hard_budget=2.0", "kl.help_threshold=0.5"):
        with pytest.raises(UsageError, match="which generation.backend=vllm cannot: use generation.backend=native"):
            load_config(None, ["generation.backend=vllm", control, "model.reference_ensemble=[a,b]"])


def _config_keys_and_defaults(obj, prefix: str) -> dict:
    """Walks the dataclasses themselves: dotted key -> default value."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_config_keys_and_defaults(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _printed_keys(text: str) -> dict:
    """`cory config` output -> {key: (default, doc)}: `key = JSON` lines, each followed by its doc."""
    lines = text.splitlines()
    assert len(lines) % 2 == 0
    out = {}
    for head, doc in zip(lines[::2], lines[1::2]):
        key, value = head.split(" = ", 1)
        assert doc.startswith("    ")
        out[key] = (json.loads(value), doc.strip())
    return out


def test_cory_config_prints_every_key_with_its_default_and_docstring(capsys):
    assert main(["config"]) == 0
    printed = _printed_keys(capsys.readouterr().out)
    expected = _config_keys_and_defaults(Config(), "")
    assert set(printed) == set(expected)
    assert {k: v for k, (v, _) in printed.items()} == expected
    docs = field_docs()
    assert all(doc and doc == docs[k] for k, (_, doc) in printed.items())


def test_cory_config_filters_by_section_and_refuses_an_unknown_one(capsys):
    assert main(["config", "kl"]) == 0
    kl = _printed_keys(capsys.readouterr().out)
    assert set(kl) == {f"kl.{f.name}" for f in dataclasses.fields(KLConfig)}
    assert main(["config", "model.lora"]) == 0
    assert set(_printed_keys(capsys.readouterr().out)) == {f"model.lora.{f.name}" for f in dataclasses.fields(LoraConfig)}
    assert main(["config", "kll"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "unknown config section 'kll'" in out.err


def _refused(name: str, key: str) -> bool:
    """Whether the config check refuses algo.<key> (set away from its default) for algorithm `name`
    as having no effect; REINFORCE's group size is tried again with the leave-one-out baseline."""
    cfg, algo = Config(), AlgoConfig(name=name)
    for k, v in algorithm_defaults(name).get("algo", {}).items():
        setattr(algo, k, v)
    default = getattr(algo, key)
    if isinstance(default, bool):
        value = not default
    elif isinstance(default, str):
        value = next(c for c in CHOICES[f"algo.{key}"] if c != default)
    else:
        value = default + (1 if isinstance(default, int) else 0.5)
    for baseline in (algo.baseline, "loo"):
        cfg.algo = dataclasses.replace(algo, **{"baseline": baseline, key: value})
        try:
            check(cfg)
            return False
        except UsageError as e:
            msg = str(e)
            if not (msg.startswith(f"algo.{key} has no effect for") and name in msg):
                return False  # refused for another reason: the no-effect check let it through
            if "unless algo.baseline=loo" not in msg:
                return True
    return True


def test_cory_algos_shows_exactly_the_keys_the_refusal_check_accepts(capsys):
    from cory.algorithms import ALGORITHMS

    assert main(["algos"]) == 0
    out = capsys.readouterr().out.splitlines()
    shown, name = {}, None
    for line in out:
        if not line.startswith(" ") and ": estimator " in line:
            name = line.split(":")[0]
        elif line.startswith("    keys: "):
            shown[name] = {k.strip() for k in line[len("    keys: "):].split(",")}
    shared = {k.strip() for k in out[-1].removeprefix("every algorithm: ").split(",")}
    assert out[-1].startswith("every algorithm: ")
    keys = [f.name for f in dataclasses.fields(AlgoConfig) if f.name != "name"]
    refused = {name: {k for k in keys if _refused(name, k)} for name in ALGORITHMS}
    specific = set().union(*refused.values())
    assert set(shown) == set(ALGORITHMS)
    for name in ALGORITHMS:
        assert shown[name] == {f"algo.{k}" for k in specific - refused[name]}, name
    assert shared == {f"algo.{k}" for k in keys if k not in specific}


def test_sampling_params_are_the_generation_sections_sampling_keys_with_its_defaults_and_check():
    from cory.build import sampling_params
    from cory.config import GenerationConfig
    from cory.generation.sampling import SAMPLING_KEYS, SamplingParams

    defaults, params = GenerationConfig(), SamplingParams()
    assert all(getattr(params, k) == type(getattr(params, k))(getattr(defaults, k)) for k in SAMPLING_KEYS)
    cfg = load_config(None, ["generation.max_new_tokens=7", "generation.top_k=3", "generation.stop_strings=[x]"])
    built = sampling_params(cfg)
    assert (built.max_new_tokens, built.top_k, built.stop_strings) == (7, 3, ("x",))
    # One check, two error types: a config key in one line, a ValueError for SamplingParams.
    with pytest.raises(UsageError, match="'generation.stop_strings'.*empty string"):
        load_config(None, ['generation.stop_strings=[""]'])
    with pytest.raises(ValueError, match="stop_strings must not contain the empty string"):
        SamplingParams(stop_strings=[""])
    with pytest.raises(UsageError, match="'generation.top_p': 1.5; must be in"):
        load_config(None, ["generation.top_p=1.5"])


def test_cory_config_into_a_closed_pipe_exits_quietly():
    """`cory config | head -1`: the reader leaves after one line; cory stops without a traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cory", "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"model.name = ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_algo_name_description_names_every_registered_algorithm():
    from cory.algorithms import ALGORITHMS

    doc = field_docs()["algo.name"]
    assert [name for name in ALGORITHMS if name not in doc] == []
