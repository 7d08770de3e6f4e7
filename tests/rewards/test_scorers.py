"""Self-information and LLMLingua-2-style classifier scorers from tiny random models saved to tmp_path."""

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    return str(path), model


def test_self_information_matches_independent_forward(tiny_lm_path):
    from rewards.significance import SelfInformationScorer

    path, model = tiny_lm_path
    scorer = SelfInformationScorer(path, threshold=0.5, batch_size=2)
    response_ids = [[5, 9, 13, 2, 40], [7, 8], [11]]
    got = scorer.self_information(response_ids)
    for ids, si in zip(response_ids, got):
        assert si.shape[0] == len(ids) and si[0] == float("inf")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        expected = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert si[1:].tolist() == pytest.approx(expected, abs=1e-4)
    flags = scorer(["a", "b", "c"], response_ids, [{}] * 3)
    assert [f.shape[0] for f in flags] == [5, 2, 1] and all(f[0] for f in flags)
    normed = (got[0][1:] - got[0][1:].min()) / (got[0][1:].max() - got[0][1:].min())
    assert flags[0][1:].tolist() == (normed >= 0.5).tolist()


def test_self_information_needs_a_model():
    from rewards.significance import SelfInformationScorer

    with pytest.raises(ValueError, match=r"reward\.bingo\.scorer\.model"):
        SelfInformationScorer(None)


def test_token_classifier_keep_probability(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    from rewards.significance import TokenClassifierScorer

    words = ["[PAD]", "[UNK]", "let", "me", "think", "9", "+", "5", "=", "14", "okay"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=2))
    model.eval()  # no dropout in the reference forward
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = TokenClassifierScorer(str(tmp_path), keep_label=1, threshold=0.5, max_length=6)
    text = "let me think 9 + 5 = 14 okay"
    flags = scorer([text])[0]
    assert flags.shape[0] == 9
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = []
    for start in range(0, len(ids), 4):  # windows of max_length - 2 tokens, min-max normalised per window
        with torch.no_grad():
            keep = torch.softmax(model(input_ids=torch.tensor([ids[start : start + 4]])).logits[0], -1)[:, 1]
        normed = (keep - keep.min()) / (keep.max() - keep.min()) if keep.max() > keep.min() else torch.ones_like(keep)
        expected += (normed >= 0.5).tolist()
    assert flags.tolist() == expected
