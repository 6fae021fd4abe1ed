"""ncp.adapters: settings validation, LoRA on the UNet, the reference context manager (exception-safe), and
save -> stock `load_lora_weights` reproducing outputs exactly with alpha != rank kept."""

import json
from pathlib import Path

import pytest
import torch

from ncp.adapters import (
    CONFIG_NAME,
    METADATA_NAME,
    REFERENCE_ADAPTER,
    WEIGHTS_NAME,
    LoraSettings,
    add_lora,
    add_reference_adapter,
    load_adapter_weights,
    lora_parameters,
    policy_reference_mode,
    reference_mode,
    save_adapter,
)
from ncp.pipelines import build_tiny_sd15, build_tiny_sdxl, encode_prompts, is_sdxl, sdxl_time_ids


def _randomize(params, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"])
    added = cond.added_cond_kwargs(sdxl_time_ids((64, 64), (0, 0), (64, 64), 2) if is_sdxl(pipe) else None)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 900]), cond.encoder_hidden_states, added_cond_kwargs=added).sample


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(target_modules=()), "empty"),
        (dict(target_modules="to_q"), "sequence"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_settings_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)


def test_settings_defaults_follow_the_paper() -> None:
    s = LoraSettings(target_modules=["to_q", "to_v"])
    assert (LoraSettings().rank, LoraSettings().alpha) == (64, 64)
    assert LoraSettings().target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert s.target_modules == ("to_q", "to_v")  # lists become tuples (hashable, frozen)
    cfg = LoraSettings(rank=4, alpha=8).peft_config()
    assert (cfg.r, cfg.lora_alpha) == (4, 8)


def test_add_lora_freezes_the_base_and_starts_as_identity() -> None:
    pipe = build_tiny_sd15()
    base_out = _unet_out(pipe)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    params = lora_parameters(pipe.unet)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert params and {id(p) for p in trainable} == {id(p) for p in params}
    assert torch.equal(_unet_out(pipe), base_out)  # B = 0 at init: policy == reference
    names = {n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A")}
    assert {n.split(".")[-2] for n in names} == {"to_q", "to_k", "to_v", "0"}
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    with pytest.raises(ValueError, match="no_such_layer"):
        add_lora(build_tiny_sd15().unet, LoraSettings(rank=4, alpha=4, target_modules=("no_such_layer",)))


def test_reference_mode_is_the_base_model_and_restores_state_after_an_exception() -> None:
    pipe = build_tiny_sdxl()
    base_out = _unet_out(pipe)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    params = lora_parameters(pipe.unet)
    _randomize(params)
    lora_out = _unet_out(pipe)
    assert not torch.allclose(lora_out, base_out)
    with reference_mode(pipe.unet):
        assert torch.equal(_unet_out(pipe), base_out)
        with reference_mode(pipe.unet):  # nesting keeps it disabled
            assert torch.equal(_unet_out(pipe), base_out)
        assert torch.equal(_unet_out(pipe), base_out)
    assert torch.equal(_unet_out(pipe), lora_out)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_mode(pipe.unet):
            raise RuntimeError("boom")
    assert torch.equal(_unet_out(pipe), lora_out)
    assert all(p.requires_grad for p in params)
    # a frozen adapter stays frozen, and adapters disabled before stay disabled after
    for p in params:
        p.requires_grad_(False)
    with reference_mode(pipe.unet):
        pass
    assert not any(p.requires_grad for p in params)
    pipe.unet.disable_adapters()
    with reference_mode(pipe.unet):
        pass
    assert torch.equal(_unet_out(pipe), base_out)
    with pytest.raises(ValueError, match="add_lora first"):
        with reference_mode(build_tiny_sd15().unet):
            pass


@pytest.mark.parametrize("build", [build_tiny_sdxl, build_tiny_sd15], ids=["sdxl", "sd15"])
def test_saved_adapter_loads_with_stock_diffusers_and_keeps_alpha(build, tmp_path: Path) -> None:
    settings = LoraSettings(rank=4, alpha=8)  # alpha != rank: without metadata diffusers would load alpha = 4
    pipe = build()
    add_lora(pipe.unet, settings)
    _randomize(lora_parameters(pipe.unet), seed=1)
    trained = _unet_out(pipe)
    folder = save_adapter(pipe, pipe.unet, tmp_path / "v1", settings, metadata={"parent": None, "votes": [1, 2]})
    assert folder == tmp_path / "v1"
    assert {p.name for p in folder.iterdir()} == {WEIGHTS_NAME, CONFIG_NAME, METADATA_NAME}
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["settings"]["alpha"] == 8 and config["peft_config"]["r"] == 4
    assert json.loads((folder / METADATA_NAME).read_text()) == {"parent": None, "votes": [1, 2]}

    fresh = build()
    fresh.load_lora_weights(str(folder), adapter_name="live")
    assert fresh.unet.peft_config["live"].lora_alpha == 8 and fresh.unet.peft_config["live"].r == 4
    assert torch.equal(_unet_out(fresh), trained)
    g = torch.Generator().manual_seed(0)
    images = fresh("a red circle", num_inference_steps=2, output_type="pt", generator=g).images
    g = torch.Generator().manual_seed(0)
    assert torch.equal(images, pipe("a red circle", num_inference_steps=2, output_type="pt", generator=g).images)


def test_load_adapter_weights_continues_from_a_saved_adapter(tmp_path: Path) -> None:
    settings = LoraSettings(rank=4, alpha=8)
    pipe = build_tiny_sdxl()
    add_lora(pipe.unet, settings)
    _randomize(lora_parameters(pipe.unet), seed=2)
    save_adapter(type(pipe), pipe.unet, tmp_path / "v1", settings)
    other = build_tiny_sdxl()
    add_lora(other.unet, settings)
    load_adapter_weights(other.unet, tmp_path / "v1")
    for a, b in zip(lora_parameters(pipe.unet), lora_parameters(other.unet), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_unet_out(other), _unet_out(pipe))
    assert all(p.requires_grad for p in lora_parameters(other.unet))  # still trainable

    wrong_rank = build_tiny_sdxl()
    add_lora(wrong_rank.unet, LoraSettings(rank=2, alpha=8))
    with pytest.raises(ValueError, match="r="):
        load_adapter_weights(wrong_rank.unet, tmp_path / "v1")
    (tmp_path / "v1" / CONFIG_NAME).unlink()  # without the config the shape check still refuses it
    with pytest.raises(ValueError, match="wrong shape"):
        load_adapter_weights(wrong_rank.unet, tmp_path / "v1")
    with pytest.raises(FileNotFoundError):
        load_adapter_weights(other.unet, tmp_path / "missing")
    with pytest.raises(ValueError, match="do not match"):
        save_adapter(pipe, pipe.unet, tmp_path / "v2", LoraSettings(rank=4, alpha=4))


def test_reference_adapter_is_the_frozen_policy_reference_beside_the_trained_one(tmp_path: Path) -> None:
    """add_reference_adapter loads a saved version as a frozen second adapter: policy_reference_mode runs it (the
    iterative-DPO reference), reference_mode still runs the bare base (the NCP encoder), and outside both the
    trainable "default" adapter alone shapes the output and alone has gradients."""
    settings = LoraSettings(rank=4, alpha=8)
    pipe = build_tiny_sdxl()
    base_out = _unet_out(pipe)
    add_lora(pipe.unet, settings)
    _randomize(lora_parameters(pipe.unet), seed=3)
    init_out = _unet_out(pipe)
    save_adapter(type(pipe), pipe.unet, tmp_path / "v1", settings)
    with policy_reference_mode(pipe.unet):  # no reference adapter: the reference is the base
        assert torch.equal(_unet_out(pipe), base_out)
    with pytest.raises(ValueError, match="no adapter named"):
        with reference_mode(pipe.unet, REFERENCE_ADAPTER):
            pass

    pipe = build_tiny_sdxl()
    add_lora(pipe.unet, settings)
    load_adapter_weights(pipe.unet, tmp_path / "v1")
    add_reference_adapter(pipe.unet, settings, tmp_path / "v1")
    trained = lora_parameters(pipe.unet, "default")
    frozen = lora_parameters(pipe.unet, REFERENCE_ADAPTER)
    assert torch.allclose(_unet_out(pipe), init_out, atol=1e-6)  # only "default" is active
    assert all(p.requires_grad for p in trained) and not any(p.requires_grad for p in frozen)
    _randomize(trained, seed=4)  # the policy moves on; the reference stays at v1
    moved = _unet_out(pipe)
    assert not torch.allclose(moved, init_out, atol=1e-4)
    with pytest.raises(RuntimeError, match="boom"):
        with policy_reference_mode(pipe.unet):
            assert torch.allclose(_unet_out(pipe), init_out, atol=1e-6)
            with reference_mode(pipe.unet):  # the NCP encoder's base, nested inside
                assert torch.equal(_unet_out(pipe), base_out)
            assert torch.allclose(_unet_out(pipe), init_out, atol=1e-6)
            raise RuntimeError("boom")
    assert torch.equal(_unet_out(pipe), moved)
    assert all(p.requires_grad for p in trained) and not any(p.requires_grad for p in frozen)
    save_adapter(type(pipe), pipe.unet, tmp_path / "v2", settings)  # the saved version is the trained adapter only
    other = build_tiny_sdxl()
    add_lora(other.unet, settings)
    load_adapter_weights(other.unet, tmp_path / "v2")
    assert torch.allclose(_unet_out(other), moved, atol=1e-6)
