import pytest

from cory.config import Config, ConfigError, field_docs, load_config, valid_keys


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
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.iteratons=3"])
    msg = str(e.value)
    assert "train.iteratons" in msg and "iterations" in msg and "\n" not in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        load_config(None, ["trian.iterations=3"])


def test_wrong_type_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.iterations=many"])
    assert "train.iterations" in str(e.value) and "\n" not in str(e.value)


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match="k1, k2, k3, full"):
        load_config(None, ["kl.estimator=k9"])
    with pytest.raises(ConfigError, match="reinforce"):
        load_config(None, ["algo.name=nope"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_with_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="algo.learning_rate.*valid keys in 'algo'.*lr"):
        load_config(f)


def test_every_field_is_documented():
    docs = field_docs()
    missing = [k for k in valid_keys() if not docs.get(k)]
    assert not missing, missing


@pytest.mark.parametrize("key,value", [("vllm_dtype", "bfloat16"), ("vllm_kv_cache_gib", "1.0"),
                                       ("vllm_gpu_memory_utilization", "0.5"), ("vllm_sleep", "false")])
def test_vllm_keys_are_refused_without_the_vllm_backend(key, value):
    with pytest.raises(ConfigError, match=f"generation.{key} only act with generation.backend=vllm"):
        load_config(None, [f"generation.{key}={value}"])
    load_config(None, ["generation.backend=vllm", f"generation.{key}={value}"])  # accepted where it acts


def test_per_token_sampling_controls_need_the_native_loop():
    with pytest.raises(ConfigError, match="need generation.backend=native"):
        load_config(None, ["generation.backend=vllm", "kl.hard_budget=2.0"])


def test_sampling_params_are_the_generation_sections_sampling_keys_with_its_defaults_and_check():
    from cory.config import SAMPLING_KEYS, GenerationConfig
    from cory.policy import SamplingParams

    defaults, params = GenerationConfig(), SamplingParams()
    assert all(getattr(params, k) == type(getattr(params, k))(getattr(defaults, k)) for k in SAMPLING_KEYS)
    cfg = load_config(None, ["generation.max_new_tokens=7", "generation.top_k=3", "generation.stop_strings=[x]"])
    built = SamplingParams.from_config(cfg.generation)
    assert (built.max_new_tokens, built.top_k, built.stop_strings) == (7, 3, ("x",))
    # One check, two error types: a config key in one line, a ValueError for SamplingParams.
    with pytest.raises(ConfigError, match="'generation.stop_strings'.*empty string"):
        load_config(None, ['generation.stop_strings=[""]'])
    with pytest.raises(ValueError, match="stop_strings must not contain the empty string"):
        SamplingParams(stop_strings=[""])
    with pytest.raises(ConfigError, match="'generation.top_p': 1.5; must be in"):
        load_config(None, ["generation.top_p=1.5"])
