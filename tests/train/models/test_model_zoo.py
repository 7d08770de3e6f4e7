import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TEST_ARCH
from train.models.model_zoo import load_model, load_tokenizer, resolve_model_path


def test_embedded_model_builds_saves_and_reloads_identically(model_cache):
    cfg = OmegaConf.create({"path": None, "cache_dir": str(model_cache), "tiny": {"vocab_size": 384, "seed": 3, "arch": TEST_ARCH}})
    path = resolve_model_path(cfg)
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert resolve_model_path(cfg) == path  # built once, reused
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer.encode("<think>", add_special_tokens=False)) == 1
    assert tokenizer.decode(tokenizer.encode("<think>\n12 + 345\n</think>", add_special_tokens=False)) == "<think>\n12 + 345\n</think>"
    model = load_model(path)
    ids = torch.tensor([tokenizer.encode("<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n", add_special_tokens=False)])
    with torch.no_grad():
        first = model(ids).logits
    resave = path.parent / "resaved"
    model.save_pretrained(resave)
    tokenizer.save_pretrained(resave)
    # the real-checkpoint code path: model.path=...
    real = OmegaConf.create({"path": str(resave), "cache_dir": "unused", "tiny": None})
    again = load_model(resolve_model_path(real))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, first)
    assert load_tokenizer(resave).encode("What is 12 + 34?") == tokenizer.encode("What is 12 + 34?")
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 < n_params < 200_000


def test_missing_model_path_is_a_clear_error(tmp_path):
    cfg = OmegaConf.create({"path": str(tmp_path / "nowhere"), "cache_dir": "x", "tiny": None})
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*no config\.json"):
        resolve_model_path(cfg)
