"""`model.norm: group` (fedmetanas/search/norms.py): every BatchNorm of a network becomes a GroupNorm of the
same channels and `affine`, nothing else changes (names, shapes, seeded values), and what motivates it holds:
a sample's output no longer depends on which other samples share its batch (a one-class client's batch
statistics), in training as in evaluation. The final network, cut from a group-norm supernet, keeps it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmetanas.config import ConfigError
from fedmetanas.configure import load_config
from fedmetanas.search.discrete import DiscreteNet
from fedmetanas.search.genotypes import resolve_primitives
from fedmetanas.search.norms import apply_norm, to_group_norm
from fedmetanas.search.supernet import SuperNet, arch_from_genotype, derive_genotype


def _supernet() -> SuperNet:
    torch.manual_seed(0)
    return SuperNet(1, 4, 4, 2, 2, resolve_primitives("metanas"), reduction_layers=(1,),
                    generator=torch.Generator().manual_seed(1), stem_stride=2)


def test_every_batch_norm_becomes_a_group_norm_of_the_same_channels_and_affine() -> None:
    # Prepare
    net = _supernet()
    bns = {name: (m.num_features, m.affine) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    params = {n: p.detach().clone() for n, p in net.named_parameters()}

    # Execute
    apply_norm(net, "group", 2)

    # Assert: the same places, channels and affine; parameters as they were; no running statistics left
    gns = {name: (m.num_channels, m.affine, m.num_groups) for name, m in net.named_modules()
           if isinstance(m, nn.GroupNorm)}
    assert bns and gns == {name: (c, affine, 2) for name, (c, affine) in bns.items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not [n for n, _ in net.named_buffers() if "running" in n or "batches_tracked" in n]
    assert {n: p for n, p in net.named_parameters()}.keys() == params.keys()
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]), n


def test_batch_norm_is_kept_as_built() -> None:
    net = _supernet()
    assert apply_norm(net, "batch", 2) is net
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_groups_that_do_not_divide_a_layer_are_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"3 groups do not divide the 4 channels of cells\.0\.pre0\.2"):
        to_group_norm(_supernet(), 3)


@pytest.mark.parametrize("norm,independent", [("batch", False), ("group", True)])
def test_a_samples_output_depends_on_its_batch_only_under_batch_norm(norm: str, independent: bool) -> None:
    # Prepare: one sample, alone and beside samples of another "client" (shifted inputs)
    net = apply_norm(_supernet(), norm, 2).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 12, 12, generator=gen)
    others = torch.randn(7, 1, 12, 12, generator=gen) + 3.0

    # Execute
    arch = arch_from_genotype(net, derive_genotype(net, net.initial_masks()))
    with torch.no_grad():
        alone = net(x, arch)[0]
        beside = net(torch.cat([x, others]), arch)[0]

    # Assert
    assert torch.allclose(alone, beside, atol=1e-5) == independent


def test_the_final_network_of_a_group_norm_supernet_is_group_norm_and_computes_what_the_supernet_did() -> None:
    # Prepare
    net = apply_norm(_supernet(), "group", 2)
    genotype = derive_genotype(net, net.initial_masks())
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(4))

    # Execute
    discrete = DiscreteNet.from_supernet(net, genotype)

    # Assert: group norms only; the supernet's output under the genotype's one-hot architecture, in
    # training mode as in evaluation (no statistics to differ)
    assert any(isinstance(m, nn.GroupNorm) for m in discrete.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in discrete.modules())
    with torch.no_grad():
        expected = net.train()(x, arch_from_genotype(net, genotype))
        torch.testing.assert_close(discrete.train()(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(discrete.eval()(x), expected, atol=1e-6, rtol=0)


def test_a_group_count_that_does_not_divide_the_channels_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.norm_groups: 3 groups do not divide model\.channels \(8\)"):
        load_config(None, ["model.norm=group", "model.norm_groups=3"])
    with pytest.raises(ConfigError, match=r"model\.norm"):
        load_config(None, ["model.norm=layer"])
    assert load_config(None, ["model.norm=group"]).model.norm == "group"


@pytest.mark.parametrize("algorithm,section", [("fedavg", "fedavg"), ("perfedavg", "perfedavg"),
                                               ("fednas", "fedavg")])
def test_a_fixed_nets_own_channels_must_split_into_the_groups_too(algorithm: str, section: str) -> None:
    # 8 model channels split into 4 groups; a fixed net of 6 channels does not
    base = [f"algorithm.name={algorithm}", "model.norm=group", "model.norm_groups=4"]
    with pytest.raises(ConfigError, match=rf"{section}\.channels: 6 channels .* model\.norm_groups \(4\)"):
        load_config(None, [*base, f"{section}.channels=6"])
    assert load_config(None, [*base, f"{section}.channels=12"]).model.norm_groups == 4
    assert load_config(None, [f"algorithm.name={algorithm}", f"{section}.channels=6"])  # batch norm: any count


def test_conversion_refreshes_what_was_derived_from_the_old_modules() -> None:
    # Prepare: the tensor lists and the stacked step's plan, built from the BatchNorm network
    from fedmetanas.search.stacked import plan_of

    net = _supernet()
    buffers_before, plan_before = len(net.buffer_list()), plan_of(net)

    # Execute
    apply_norm(net, "group", 2)

    # Assert: both rebuilt from the GroupNorm modules (no running statistics listed), kept once rebuilt
    assert buffers_before and net.buffer_list() == list(net.buffers())
    assert not any("running" in n for n, _ in net.named_buffers())
    assert plan_of(net) is not plan_before and plan_of(net) is plan_of(net)
    assert plan_of(net).buffer_members == 0 < plan_before.buffer_members
