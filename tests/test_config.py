"""Typed, frozen configuration: YAML in, one-line ConfigErrors naming the field for every mistake."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmetanas.algorithms import ALGORITHMS, declared_sections
from fedmetanas.config import (MIN_COLLECTIVE_TIMEOUT_S, TAU_FLOOR, Config, ConfigError, _UniqueKeyLoader, all_sections,
                               to_dict)
from fedmetanas.configure import config_from_dict, default_config, load_config, section_classes
from fedmetanas.search.genotypes import DARTS_V2

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# -- loading -----------------------------------------------------------------------------------
def test_defaults_load_without_a_file():
    cfg = load_config(None)

    # Config() knows no registry: it holds the core defaults and no algorithm section, which is the
    # default run as long as the default algorithm (fedmetanas) declares no section of its own.
    assert cfg == Config() and cfg.algorithm.name == "fedmetanas" and cfg.sections == {}
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
    assert set(data) == set(all_sections({}))  # the core sections: fedmetanas declares none of its own


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
    assert load_config(None, ["algorithm.name=fedavg", "fedavg.architecture=cnn"]).fedavg.architecture == "cnn"
    with pytest.raises(ConfigError, match="fedavg.architecture"):
        load_config(None, ["fedavg.architecture=resnet"])


def test_an_algorithm_name_typo_names_the_field_and_the_nearest_choice():
    with pytest.raises(ConfigError, match="algorithm.name.*'fednas'"):
        load_config(None, ["algorithm.name=fednsa"])


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == default_config()


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_config_holds_the_core_sections_and_only_its_algorithms_own(name):
    cfg = load_config(None, [f"algorithm.name={name}"])

    own = list(ALGORITHMS[name].sections)
    assert list(cfg.sections) == own
    assert list(to_dict(cfg)) == list(all_sections({k: ALGORITHMS[name].sections[k] for k in own}))
    for other in set(declared_sections()) - set(own):
        with pytest.raises(AttributeError, match=f"section '{other}'.*only its algorithm's sections"):
            getattr(cfg, other)


def test_another_algorithms_section_is_checked_but_not_kept():
    # Prepare / Execute: fedavg's settings under FedMetaNAS, the default algorithm, which never reads them
    cfg = load_config(None, ["fedavg.lr=0.5", "perfedavg.architecture=cnn"])

    # Assert: the run is the default run; a typo or a bad value in such a section still fails at once
    assert cfg == default_config()
    with pytest.raises(ConfigError, match=r"^unknown config key 'fedavg\.lrr'; did you mean 'fedavg\.lr'\?$"):
        load_config(None, ["fedavg.lrr=0.5"])
    with pytest.raises(ConfigError, match=r"^fednas\.lr_w: -1\.0 is out of range"):
        load_config(None, ["fednas.lr_w=-1.0"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'fedav'; did you mean 'fedavg'\?$"):
        config_from_dict({"fedav": {"lr": 0.5}})


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_saved_config_yaml_holds_only_the_active_algorithms_sections_and_loads_back_the_same(tmp_path, name):
    # Prepare: a config with a non-default value in each of the algorithm's own sections
    overrides = [f"algorithm.name={name}", "federated.rounds=7"]
    overrides += [f"{k}=" + "{local_steps: 4}" for k in ALGORITHMS[name].sections if k in ("fednas", "fedavg")]
    cfg = load_config(None, overrides)

    # Execute: what a run writes to its config.yaml (federated/callbacks.py), read back
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    again = load_config(_write(tmp_path, text))

    # Assert
    other = set(declared_sections()) - set(ALGORITHMS[name].sections)
    assert not other & set(yaml.safe_load(text))
    assert again == cfg


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
    ("algorithm", "plain_after_fraction", 1.5),
    ("algorithm", "lr_warmup_fraction", 1.0),
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


def test_a_section_override_sets_its_keys_and_keeps_the_files_others(tmp_path):
    """Issue 21: `federated={seed: 1}` used to replace the whole section, so the file's rounds and clients
    silently fell back to the defaults (20 rounds, 8 clients)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("federated:\n  rounds: 2\n  num_clients: 4\nmodel:\n  channels: 4\n")

    cfg = load_config(path, ["federated={seed: 1}", "model={layers: 2}"])

    assert (cfg.federated.rounds, cfg.federated.num_clients, cfg.federated.seed) == (2, 4, 1)
    assert (cfg.model.channels, cfg.model.layers) == (4, 2)


def test_an_optional_text_field_keeps_its_override_as_typed():
    """Issue 21 (extra input): `runtime.master_addr=[::1]` was refused as "not valid YAML"; null still means None."""
    assert load_config(None, ["runtime.master_addr=[::1]"]).runtime.master_addr == "[::1]"
    assert load_config(None, ["runtime.master_addr=null"]).runtime.master_addr is None


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


# -- hostile values (issue 10): each refused at load, naming the field ---------------------------
def _float_fields() -> list[str]:
    """Every float field of every section, as section.key."""
    out = []
    for name, cls in section_classes().items():
        out += [f"{name}.{key}" for key, tp in typing.get_type_hints(cls).items() if tp is float]
    return out


@pytest.mark.parametrize("field", _float_fields())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_float_setting_accepts_infinity_or_nan(field, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .* not a finite number"):
        load_config(None, [f"{field}={value}"])


def test_the_float_fields_include_every_learning_rate():
    lrs = {f for f in _float_fields() if "lr" in f.split(".")[1]}
    assert {"algorithm.inner_lr_w", "algorithm.meta_lr_alpha", "algorithm.reptile_lr_w", "fednas.lr_w",
            "fednas.lr_alpha", "fedavg.lr", "personalize.lr"} <= lrs


def test_an_infinite_dirichlet_alpha_is_named_and_points_to_the_iid_partition():
    with pytest.raises(ConfigError, match=r"^data\.dirichlet_alpha: .*data\.partition: iid"):
        load_config(None, ["data.dirichlet_alpha=.inf"])


def test_plain_steps_under_reptile_are_refused_naming_both_fields():
    with pytest.raises(ConfigError,
                       match=r"^algorithm\.plain_after_fraction: 0\.5 needs algorithm\.meta_update: fomaml"):
        load_config(None, ["algorithm.plain_after_fraction=0.5", "algorithm.meta_update=reptile"])


def test_plain_steps_are_refused_for_per_fedavg_whose_meta_steps_they_would_replace():
    with pytest.raises(ConfigError, match=r"^algorithm\.plain_after_fraction: 0\.5 is FedMetaNAS's"):
        load_config(None, ["algorithm.name=perfedavg", "algorithm.plain_after_fraction=0.5"])


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_outside_32_bits_is_rejected_instead_of_aliasing_another(seed):
    with pytest.raises(ConfigError, match=r"federated\.seed: .*0\.\.4294967295"):
        load_config(None, [f"federated.seed={seed}"])


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_the_seed_range_ends_are_accepted(seed):
    assert load_config(None, [f"federated.seed={seed}"]).federated.seed == seed


@pytest.mark.parametrize("overrides", [["search.tau_min=1e-300", "search.tau_max=1e-300"], ["search.tau_min=0.0005"]])
def test_a_temperature_below_the_floor_is_rejected(overrides):
    with pytest.raises(ConfigError, match=rf"search\.tau_(min|max): .*>= {TAU_FLOOR:g}"):
        load_config(None, overrides)


def test_the_temperature_floor_itself_is_accepted():
    cfg = load_config(None, [f"search.tau_min={TAU_FLOOR}"])
    assert cfg.search.tau_min == TAU_FLOOR


@pytest.mark.parametrize("value", ["1e-9", "0.5", "4.9"])
def test_a_collective_timeout_below_the_minimum_is_named(value):
    with pytest.raises(ConfigError, match=rf"runtime\.collective_timeout_s: .*>= {MIN_COLLECTIVE_TIMEOUT_S:g}"):
        load_config(None, [f"runtime.collective_timeout_s={value}"])


def test_a_key_repeated_in_the_yaml_file_is_named_with_both_lines(tmp_path):
    path = _write(tmp_path, "federated:\n  rounds: 3\n  seed: 1\n  rounds: 5\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(path) in str(info.value) and "'rounds'" in str(info.value) and "lines 2 and 4" in str(info.value)


def test_a_repeated_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'federated' appears twice"):
        load_config(_write(tmp_path, "federated: {rounds: 3}\nmodel: {layers: 2}\nfederated: {seed: 1}\n"))


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    path = _write(tmp_path, "base: &b {rounds: 3, seed: 1}\n")
    data = yaml.load(path.read_text() + "federated: {<<: *b, rounds: 5}\n", Loader=_UniqueKeyLoader)  # noqa: S506

    assert data["federated"] == {"rounds": 5, "seed": 1}


def test_a_config_that_is_not_utf8_is_named_in_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output:\n  name: caf\u00e9\n".encode("latin-1"))

    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not UTF-8 .*save the config as UTF-8"):
        load_config(path)


def test_personalization_without_a_local_test_split_is_refused():
    with pytest.raises(ConfigError, match=r"data\.local_test_fraction is 0.*personalize\.steps"):
        load_config(None, ["data.local_test_fraction=0"])


def test_no_local_test_split_is_fine_without_personalization():
    cfg = load_config(None, ["data.local_test_fraction=0", "personalize.steps=0"])
    assert cfg.data.local_test_fraction == 0


def _genotype(**changes) -> str:
    return DARTS_V2._replace(**changes).to_string()


@pytest.mark.parametrize(("genotype", "expected"), [
    (_genotype(normal=[[("sep_conv_3x3", 0), ("sep_conv_9x9", 1)]] + DARTS_V2.normal[1:]), "unknown op 'sep_conv_9x9'"),
    (_genotype(normal=[[("none", 0), ("sep_conv_3x3", 1)]] + DARTS_V2.normal[1:]), "unknown op 'none'"),
    (_genotype(normal=DARTS_V2.normal[:3] + [[("skip_connect", 0), ("dil_conv_3x3", 5)]]), "input 5 out of range"),
    (_genotype(reduce=[[("max_pool_3x3", -1), ("max_pool_3x3", 1)]] + DARTS_V2.reduce[1:]), "input -1 out of range"),
    (_genotype(normal_concat=[2, 3, 4, 9]), "normal_concat [2, 3, 4, 9]"),
    (_genotype(reduce=DARTS_V2.reduce[:2], reduce_concat=[2, 3]), "the normal cell has 4 nodes but the reduce cell 2"),
])
def test_a_genotype_architecture_is_checked_at_load(genotype, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.name=fedavg", f"fedavg.architecture={genotype}"])

    assert str(info.value).startswith("fedavg.architecture: ") and expected in str(info.value)


def test_a_genotype_without_the_reduce_cell_its_network_needs_is_refused():
    normal_only = "{'normal': [[('conv_3x3', 0), ('skip_connect', 1)]], 'normal_concat': [2]}"
    with pytest.raises(ConfigError, match=r"fedavg\.architecture: the genotype has no reduce cell"):
        load_config(None, ["algorithm.name=fedavg", "model.layers=3", f"fedavg.architecture={normal_only}"])
    cfg = load_config(None, ["algorithm.name=fedavg", "model.layers=1", f"fedavg.architecture={normal_only}"])
    assert cfg.fedavg.architecture == normal_only


def test_a_genotype_override_with_commas_survives_the_command_line():
    # What the shell passes for fedavg.architecture="{...}": the quotes are gone, the commas stay.
    text = DARTS_V2.to_string()

    cfg = load_config(None, ["algorithm.name=fedavg", f"fedavg.architecture={text}"])

    assert cfg.fedavg.architecture == text


@pytest.mark.parametrize("name", [".", "..", "../x", "a/../../b", "/abs/dir", "", "a//b", "./a", "x" * 256])
def test_a_run_name_that_would_leave_output_dir_is_refused(name):
    with pytest.raises(ConfigError, match=r"^output\.name \(--name\): "):
        load_config(None, [f"output.name={name}"])


@pytest.mark.parametrize(("name", "expected"), [("demo", "demo"), ("sweep/alpha-0.5", "sweep/alpha-0.5"),
                                                ("2024", "2024"), ("yes", "yes"), ("x" * 255, "x" * 255)])
def test_a_run_name_is_taken_as_text(name, expected):
    assert load_config(None, [f"output.name={name}"]).output.name == expected


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_personalization_holdout_that_leaves_nothing_to_adapt_on_is_named(value):
    with pytest.raises(ConfigError, match=r"^personalize\.holdout: .*\[0, 1\)"):
        load_config(None, [f"personalize.holdout={value}"])


def test_personalization_adapts_the_discrete_net_with_frozen_bn_and_a_held_out_check_by_default():
    p = load_config(None).personalize
    assert (p.adapt, p.bn, p.holdout, p.holdout_z) == ("discrete", "frozen", 0.2, 1.645)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_a_held_out_threshold_that_is_not_a_number_of_standard_errors_is_named(value):
    with pytest.raises(ConfigError, match=r"^personalize\.holdout_z: "):
        load_config(None, [f"personalize.holdout_z={value}"])


# -- layering: the config imports no algorithm -------------------------------------------------------------
def _package_imports(path: Path) -> set[str]:
    """The fedmetanas modules a file imports anywhere in it (inside functions too)."""
    import ast  # noqa: PLC0415

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "fedmetanas"}


def test_the_config_imports_no_algorithm_so_the_algorithms_may_read_it():
    """Issue 22: config.py imported the registry, which imports every algorithm, which imports config.py.
    The registry's sections now come in through fedmetanas.configure; config.py reaches only the search
    space's leaf modules, which import nothing of the package."""
    leaves = {"fedmetanas.search.operations", "fedmetanas.search.genotypes"}
    assert _package_imports(REPO / "fedmetanas" / "config.py") <= leaves
    for leaf in leaves:
        assert _package_imports(REPO / (leaf.replace(".", "/") + ".py")) == set(), leaf
