"""Every storage type through the registry: what it declares agrees with what it writes, what it
writes reads back (write→read roundtrip), and readers dispatch on the recorded type, not on names."""
from __future__ import annotations

import pytest
import torch

from bloomconv.errors import QuantizationError
from bloomconv.format import QuantType
from bloomconv.runtime.records import UnitBytes
from bloomconv.settings import QuantSettings
from bloomconv.storage import (DenseWeight, Int8Weight, dequantize_tensors, registered_types, storage_for)

SETTINGS = {
    QuantType.NONE: [None],
    QuantType.INT8: [QuantSettings(QuantType.INT8), QuantSettings(QuantType.INT8, int8_scale_from="source")],
    QuantType.NF4: [QuantSettings(QuantType.NF4), QuantSettings(QuantType.NF4, 64, False)],
    QuantType.FP4: [QuantSettings(QuantType.FP4), QuantSettings(QuantType.FP4, 32, False)],
}
# worst |error| / row absmax of one weight: int8 rounds to 1/254 of it; 4-bit to half the widest
# gap between codes (NF4 0.152, FP4 0.167 of a block's absmax, a row's at most); bf16 rounding on top
BOUND = {QuantType.NONE: 0.0, QuantType.INT8: 0.5 / 127 + 1e-3, QuantType.NF4: 0.16, QuantType.FP4: 0.175}


def cases():
    return [(t, s) for t in registered_types() for s in SETTINGS[t]]


def test_every_registered_type_is_covered():
    assert set(registered_types()) == set(QuantType) == set(SETTINGS)


@pytest.mark.parametrize("quant_type, settings", cases(), ids=lambda v: str(getattr(v, "value", v)))
@pytest.mark.parametrize("shape", [(48, 256), (7, 320)])
def test_roundtrip_through_the_registry(quant_type, settings, shape):
    storage = storage_for(quant_type.value)
    g = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    stored = storage.encode(weight, settings)
    assert tuple(stored) == storage.stored_names(settings)
    data_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if "quant_state" not in k)
    assert data_bytes == storage.stored_bytes(shape, weight.element_size(), settings)

    decoded = storage.decode_mapping(stored)
    assert decoded.shape == shape
    restored = decoded.dequantize(torch.float32)
    error = (restored - weight.float()).abs() / weight.float().abs().amax(dim=1, keepdim=True)
    assert error.max() <= BOUND[quant_type]
    x = torch.randn(3, shape[1], generator=g)
    assert torch.allclose(decoded.matmul(x), x @ restored.T, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[0, shape[0] - 1], [2, 2]])
    assert torch.equal(decoded.rows(ids, torch.float32), restored[ids])


def test_a_missing_companion_tensor_is_named():
    stored = storage_for("int8").encode(torch.randn(4, 64), None)
    del stored["SCB"]
    with pytest.raises(QuantizationError, match="tagged int8 but its 'SCB' tensor is missing"):
        storage_for("int8").decode_mapping(stored, name="m.weight")


def test_a_state_of_another_type_is_refused():
    stored = storage_for("fp4").encode(torch.randn(4, 64), QuantSettings(QuantType.FP4, 64, False))
    stored["weight.quant_state.bitsandbytes__nf4"] = stored.pop("weight.quant_state.bitsandbytes__fp4")
    with pytest.raises(QuantizationError, match="tagged nf4 but its state describes a fp4"):
        storage_for("nf4").decode_mapping(stored)


def test_an_unknown_tag_says_to_upgrade():
    with pytest.raises(QuantizationError, match="upgrade bloomconv"):
        storage_for("q3_k")


def test_the_runtime_reads_the_recorded_type_not_the_tensor_names():
    CB, SCB = storage_for("int8").encode(torch.randn(4, 64), None).values()
    tensors = {"m.weight": CB, "m.SCB": SCB}
    as_int8 = UnitBytes(tensors, {"m.weight": QuantType.INT8, "m.SCB": QuantType.INT8})
    as_plain = UnitBytes(tensors, {"m.weight": QuantType.NONE, "m.SCB": QuantType.NONE})
    assert isinstance(as_int8.weight("m"), Int8Weight)
    assert isinstance(as_plain.weight("m"), DenseWeight)  # an SCB next to it changes nothing


def test_dequantize_tensors_follows_the_tags():
    stored = storage_for("nf4").encode(torch.randn(4, 64), QuantSettings(QuantType.NF4, 64))
    tensors = {f"m.{k}": v for k, v in stored.items()} | {"m.bias": torch.zeros(4)}
    tags = {name: QuantType.NF4 for name in tensors} | {"m.bias": QuantType.NONE}
    plain = dequantize_tensors(tensors, tags)
    assert sorted(plain) == ["m.bias", "m.weight"] and plain["m.weight"].shape == (4, 64)
