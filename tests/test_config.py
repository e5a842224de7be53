"""Typed, frozen configuration: YAML in, one-line ConfigErrors naming the field for every mistake."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmetanas.config import Config, ConfigError, config_from_dict, load_config, section_classes, to_dict

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# -- loading -----------------------------------------------------------------------------------
def test_defaults_load_without_a_file():
    cfg = load_config(None)

    assert cfg == Config()
    assert cfg.federated.num_clients == 8 and cfg.search.tau_schedule == "linear"


def test_a_yaml_file_sets_the_fields_it_names_and_keeps_the_other_defaults(tmp_path):
    path = _write(tmp_path, """
data: {name: mnist, dirichlet_alpha: 1e-1}
model: {primitives: [conv_3x3, skip_connect], reduction_layers: [1], layers: 2}
algorithm: {inner_betas: [0.5, 0.9], meta_update: reptile}
federated: {rounds: 4}
""")

    cfg = load_config(path)

    assert cfg.data.name == "mnist"
    assert cfg.data.dirichlet_alpha == 0.1 and isinstance(cfg.data.dirichlet_alpha, float)  # YAML's "1e-1" string
    assert cfg.model.primitives == ("conv_3x3", "skip_connect")
    assert cfg.model.reduction_layers == (1,)
    assert cfg.algorithm.inner_betas == (0.5, 0.9)
    assert cfg.algorithm.meta_update == "reptile"
    assert cfg.federated.rounds == 4
    assert cfg.federated.num_clients == Config().federated.num_clients


def test_a_yaml_file_round_trips_through_to_dict(tmp_path):
    cfg = load_config(_write(tmp_path, "model: {primitives: [conv_3x3, sep_conv_3x3], reduction_layers: [0]}\n"
                                       "search: {gumbel: soft, tau_min: 0.2}\n"))

    data = to_dict(cfg)
    again = load_config(_write(tmp_path, yaml.safe_dump(data)))

    assert again == cfg
    assert data["model"]["primitives"] == ["conv_3x3", "sep_conv_3x3"]  # tuples become lists
    assert set(data) == set(section_classes())  # every section, the algorithms' own beside the core ones


def test_the_shipped_default_config_loads_and_round_trips():
    cfg = load_config(REPO / "configs" / "default.yaml")

    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(REPO / path)

    assert config_from_dict(to_dict(cfg)) == cfg
    if "paper" in path:  # GPU-sized: whole test set, CUDA streams, full resolution
        assert cfg.runtime.device == "cuda" and cfg.eval.subset == 0 and cfg.model.stem_stride == 1
        assert cfg.data.download and cfg.data.name in path


def test_the_baseline_configs_share_the_default_configs_data_clients_and_evaluation():
    base = load_config(REPO / "configs" / "default.yaml")
    for name, algorithm in (("fednas.yaml", "fednas"), ("fedavg.yaml", "fedavg")):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.algorithm.name == algorithm
        assert (cfg.data, cfg.eval) == (base.data, base.eval)
        assert dataclasses.replace(cfg.federated, rounds=base.federated.rounds) == base.federated
        assert (cfg.model.channels, cfg.model.layers, cfg.model.stem_stride) == (
            base.model.channels, base.model.layers, base.model.stem_stride)


def test_fedavg_architecture_must_be_a_known_network_or_a_genotype_string():
    assert load_config(None, ["fedavg.architecture=cnn"]).fedavg.architecture == "cnn"
    with pytest.raises(ConfigError, match="fedavg.architecture"):
        load_config(None, ["fedavg.architecture=resnet"])


def test_an_algorithm_name_typo_names_the_field_and_the_nearest_choice():
    with pytest.raises(ConfigError, match="algorithm.name.*'fednas'"):
        load_config(None, ["algorithm.name=fednsa"])


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


def test_config_is_frozen():
    cfg = load_config(None)

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federated.rounds = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federated = None  # type: ignore[misc]


# -- errors name the field ---------------------------------------------------------------------
def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_unknown_key_suggests_the_nearest_valid_one():
    msg = _error({"federated": {"num_client": 4}})

    assert "federated.num_client" in msg
    assert "federated.num_clients" in msg


def test_unknown_section_is_named_and_the_nearest_suggested():
    msg = _error({"federatd": {"rounds": 4}})

    assert "'federatd'" in msg and "federated" in msg


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    msg = _error({"eval": {"zzzzzz": 1}})

    assert "eval.zzzzzz" in msg and "every" in msg and "batch_size" in msg


@pytest.mark.parametrize(("data", "field", "expected"), [
    ({"federated": {"rounds": "five"}}, "federated.rounds", "integer"),
    ({"federated": {"rounds": 2.5}}, "federated.rounds", "integer"),
    ({"federated": {"rounds": True}}, "federated.rounds", "integer"),
    ({"data": {"download": 1}}, "data.download", "true or false"),
    ({"data": {"download": "yes please"}}, "data.download", "true or false"),
    ({"search": {"tau_max": "hot"}}, "search.tau_max", "number"),
    ({"output": {"name": 3}}, "output.name", "string"),
    ({"algorithm": {"inner_betas": [0.1]}}, "algorithm.inner_betas", "2 values"),
    ({"algorithm": {"inner_betas": 0.1}}, "algorithm.inner_betas", "list"),
    ({"model": {"reduction_layers": ["a"]}}, "model.reduction_layers", "null"),
    ({"model": "big"}, "model", "mapping"),
])
def test_wrong_types_name_the_field(data, field, expected):
    msg = _error(data)

    assert field in msg and expected in msg


@pytest.mark.parametrize("value", [0, -0.5, "-1"])
def test_dirichlet_alpha_must_be_positive(value):
    msg = _error({"data": {"dirichlet_alpha": value}})

    assert "data.dirichlet_alpha" in msg and "> 0" in msg


@pytest.mark.parametrize(("section", "key", "value"), [
    ("model", "stem_stride", 3),
    ("federated", "participation", 0.0),
    ("federated", "participation", 1.5),
    ("search", "anneal_fraction", 0),
    ("data", "local_test_fraction", 1.0),
    ("algorithm", "inner_lr_w", -1e-3),
    ("eval", "batch_size", 0),
    ("runtime", "threads_per_rank", 0),
])
def test_out_of_range_values_name_the_field(section, key, value):
    msg = _error({section: {key: value}})

    assert f"{section}.{key}" in msg and "out of range" in msg


def test_unknown_dataset_name_suggests_the_spelling():
    msg = _error({"data": {"name": "fashionmnist"}})

    assert "data.name" in msg and "'fashion_mnist'" in msg


def test_unknown_primitive_in_an_explicit_list_is_named():
    msg = _error({"model": {"primitives": ["sep_conv_3x3", "sep_conv_9x9"]}})

    assert "model.primitives" in msg and "'sep_conv_9x9'" in msg


def test_unknown_primitive_set_name_is_rejected():
    msg = _error({"model": {"primitives": "dart"}})

    assert "model.primitives" in msg and "'darts'" in msg


def test_repeated_primitives_are_rejected():
    msg = _error({"model": {"primitives": ["conv_3x3", "conv_3x3"]}})

    assert "model.primitives" in msg and "once" in msg


def test_unknown_schedule_suggests_the_spelling():
    msg = _error({"search": {"tau_schedule": "linaer"}})

    assert "search.tau_schedule" in msg and "'linear'" in msg


def test_tau_min_above_tau_max_is_rejected():
    msg = _error({"search": {"tau_min": 2.0, "tau_max": 1.0}})

    assert "search.tau_min" in msg and "search.tau_max" in msg


def test_more_clients_per_round_than_clients_is_rejected():
    msg = _error({"federated": {"num_clients": 4, "clients_per_round": 5}})

    assert "federated.clients_per_round" in msg and "federated.num_clients" in msg


def test_reduction_layers_outside_the_network_are_rejected():
    msg = _error({"model": {"layers": 3, "reduction_layers": [1, 3]}})

    assert "model.reduction_layers" in msg and "[3]" in msg


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "federated:\n  rounds: 5\n  seed: [1, 2\nmodel:\n  layers: 2\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    msg = str(info.value)
    assert str(path) in msg and "malformed YAML" in msg
    assert "line 4" in msg


def test_a_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = _write(tmp_path, "- data\n- model\n")

    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(path) in str(info.value) and "not found" in str(info.value)


# -- overrides ---------------------------------------------------------------------------------
def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = _write(tmp_path, "federated: {rounds: 4, seed: 3}\n")

    cfg = load_config(path, ["federated.rounds=9", "model.primitives=[conv_3x3, skip_connect]",
                             "search.tau_schedule=cosine", "data.download=true"])

    assert cfg.federated.rounds == 9 and cfg.federated.seed == 3
    assert cfg.model.primitives == ("conv_3x3", "skip_connect")
    assert cfg.search.tau_schedule == "cosine"
    assert cfg.data.download is True


def test_overrides_do_not_mutate_the_callers_mapping():
    data = {"federated": {"rounds": 4}}

    config_from_dict(data, ["federated.rounds=6"])

    assert data == {"federated": {"rounds": 4}}


def test_the_last_override_of_a_key_wins():
    cfg = config_from_dict({}, ["federated.rounds=6", "federated.rounds=7"])

    assert cfg.federated.rounds == 7


@pytest.mark.parametrize("override", ["federated.rounds", "federated.rounds 5"])
def test_an_override_without_equals_sign_is_rejected(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        config_from_dict({}, [override])


def test_an_override_of_an_unknown_key_is_named():
    with pytest.raises(ConfigError, match="federated.round'"):
        config_from_dict({}, ["federated.round=5"])


def test_an_override_with_a_value_of_the_wrong_type_is_named():
    with pytest.raises(ConfigError, match="federated.rounds"):
        config_from_dict({}, ["federated.rounds=many"])


@pytest.mark.parametrize("override", ["federated.rounds=[1", "model.primitives=: :"])
def test_an_override_with_malformed_yaml_raises_config_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        config_from_dict({}, [override])


def test_an_integer_too_large_for_a_float_field_raises_config_error(tmp_path):
    path = _write(tmp_path, "search:\n  tau_max: " + "9" * 400 + "\n")

    with pytest.raises(ConfigError, match="search.tau_max"):
        load_config(path)


def test_inner_betas_outside_the_unit_interval_are_rejected():
    msg = _error({"algorithm": {"inner_betas": [2.0, 0.5]}})

    assert "algorithm.inner_betas" in msg


def test_primitives_with_only_the_none_op_are_rejected():
    msg = _error({"model": {"primitives": ["none"]}})

    assert "model.primitives" in msg


# -- fuzz: any YAML-like mapping gives a Config or a ConfigError, nothing else -------------------
_SECTIONS = section_classes()  # the core sections and every registered algorithm's
_WORDS = ["darts", "metanas", "conv_3x3", "sep_conv_3x3", "none", "linear", "cosine", "hard", "soft", "pairs",
          "fomaml", "reptile", "sgd", "mnist", "digits", "iid", "auto", "1e-3", "nan", "-inf", "0", "", "x y"]
# Integers beyond 64 bits are covered by test_an_integer_too_large_for_a_float_field_raises_config_error.
# A small alphabet for free text keeps generation fast (the full Unicode strategy costs seconds here).
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(), st.sampled_from(_WORDS))
_ODD_KEY = st.one_of(st.text("abz_.0-", max_size=4), st.integers(-3, 3), st.none(), st.booleans())
_VALUE = st.one_of(_LEAF, st.lists(_LEAF, max_size=3), st.dictionaries(_ODD_KEY, _LEAF, max_size=2))


def _section(cls: type) -> st.SearchStrategy:
    """Mostly the section's real keys (so values reach type and range checks), sometimes junk keys."""
    keys = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(cls)]), _ODD_KEY)
    return st.dictionaries(keys, _VALUE, max_size=4)


_TOP = st.one_of(
    st.fixed_dictionaries({}, optional={name: st.one_of(_section(cls), _VALUE) for name, cls in _SECTIONS.items()}),
    st.dictionaries(_ODD_KEY, _VALUE, max_size=3),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_TOP)
def test_config_from_dict_returns_a_config_or_raises_config_error(data):
    try:
        cfg = config_from_dict(data)
    except ConfigError as err:
        assert str(err)
    else:
        assert isinstance(cfg, Config)
        assert repr(config_from_dict(to_dict(cfg))) == repr(cfg)  # repr: NaN never equals itself
