"""Token-significance scorers for Bingo's significance-aware length reward (arXiv 2506.08125).

A scorer maps a batch to one boolean vector per response (True = significant unit)::

    scorer(responses: list[str], response_ids: list[list[int]], metadata: list[dict]) -> list[BoolTensor]

Units are the scorer's own tokens; Bingo only uses counts and ratios to a reference scored the same
way, so the unit cancels. Three scorers:
- ``ExactLabelScorer``: given filler sentences are insignificant (the synthetic generator's, named by the config).
- ``SelfInformationScorer``: -log p(token | prefix) under a causal LM (the default that runs offline).
- ``TokenClassifierScorer``: an LLMLingua-2-style token classifier given by a local path (the paper's
  choice, microsoft/llmlingua-2-xlm-roberta-large-meetingbank; P(keep) per token).
Following the authors' release (github microsoft/Bingo, ``verl_patches/trainer/ppo/ray_trainer.py``), scores
are min-max normalised per response/chunk and a unit is significant iff its normalised score >= threshold
(their run script uses I_THRESHOLD = 0.5). A response whose scores are all equal counts as all significant.
"""

from __future__ import annotations

import re

import torch


def _threshold(scores: torch.Tensor, threshold: float, normalize: str) -> torch.Tensor:
    if normalize == "none":
        return scores >= threshold
    if normalize != "minmax":
        raise ValueError(f"reward.bingo.scorer.normalize must be 'minmax' or 'none', got {normalize!r}")
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    finite = scores[torch.isfinite(scores)]
    if finite.numel() == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    lo, hi = finite.min(), finite.max()
    if hi == lo:
        return torch.ones_like(scores, dtype=torch.bool)
    normed = ((scores - lo) / (hi - lo)).nan_to_num(posinf=1.0, neginf=0.0)
    return normed >= threshold


class ExactLabelScorer:
    """Units inside an occurrence of a filler sentence are insignificant; everything else is significant.

    ``filler_sentences``: insignificant in every response (configs/significance/exact_labels.yaml names the
    synthetic generator's, ``data_pipelines.arithmetic.FILLER_SENTENCES``); sentences listed in a sample's
    ``metadata["filler_sentences"]`` (flat or per turn) are added. ``tokenizer``: a tokenizer object or path, to
    count in tokens via offsets; without it units are whitespace-separated words.
    """

    def __init__(self, filler_sentences: list[str] | tuple[str, ...] = (), tokenizer=None):
        self.filler_sentences = list(filler_sentences or ())
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer

    def _spans(self, text: str) -> list[tuple[int, int]]:
        if self.tokenizer is None:
            return [m.span() for m in re.finditer(r"\S+", text)]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in enc["offset_mapping"]]

    def __call__(self, responses, response_ids=None, metadata=None):
        out = []
        for i, text in enumerate(responses):
            fillers = set(self.filler_sentences)
            extra = (metadata[i] if metadata else {}).get("filler_sentences") or []
            for item in extra:
                fillers.update(item if isinstance(item, (list, tuple)) else [item])
            covered = []
            for sentence in fillers:
                covered += [(m.start(), m.end()) for m in re.finditer(re.escape(sentence), text)]
            spans = self._spans(text)
            significant = [not any(a >= s and b <= e for s, e in covered) for a, b in spans]
            out.append(torch.tensor(significant, dtype=torch.bool))
        return out


class SelfInformationScorer:
    """Self-information I_t = -log p(o_t | prompt?, o_<t) under a reference causal LM; high = significant.

    ``model``: a path (loaded with AutoModelForCausalLM.from_pretrained) or a built model. It must share the
    policy's tokenizer (it scores ``response_ids`` directly), e.g. the reference policy. The first response
    token has no prefix (unless ``prefix_ids`` is given) and counts as significant. No gradient; batched.
    """

    def __init__(
        self,
        model,
        threshold: float = 0.5,
        normalize: str = "minmax",
        batch_size: int = 16,
        device: str = "cpu",
        prefix_ids: list[int] | None = None,
    ):
        if model is None:
            raise ValueError(
                "reward.bingo.scorer.model is null: set it to the reference LM's local path (the RL recipe sets the "
                "resolved policy path), or use rewards.significance.ExactLabelScorer"
            )
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model = model.to(device).eval()
        self.threshold, self.normalize = threshold, normalize
        self.batch_size, self.device = batch_size, device
        self.prefix_ids = list(prefix_ids or [])

    @torch.no_grad()
    def self_information(self, response_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per-token -log p [len_i] for each response (first token +inf when there is no prefix)."""
        out = []
        prefix = self.prefix_ids
        for start in range(0, len(response_ids), self.batch_size):
            chunk = [prefix + list(ids) for ids in response_ids[start : start + self.batch_size]]
            width = max(1, max(len(ids) for ids in chunk))
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [chunk, width], right padded
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, : len(ids)] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [chunk, width-1, vocab]
            token_lp = logprobs.gather(-1, input_ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1).cpu()
            for row, ids in enumerate(chunk):
                n = len(ids) - len(prefix)
                si = -token_lp[row, : len(ids) - 1]  # information of tokens 1..len-1
                si = torch.cat([torch.tensor([float("inf")]), si]) if not prefix else si[len(prefix) - 1 :]
                out.append(si[:n])
        return out

    def __call__(self, responses, response_ids, metadata=None):
        if response_ids is None:
            raise ValueError("reward.bingo.scorer (self_information) needs response_ids from the rollout")
        return [_threshold(si, self.threshold, self.normalize) for si in self.self_information(response_ids)]


class TokenClassifierScorer:
    """LLMLingua-2-style significance (Pan et al., arXiv 2403.12968): P(keep | token) from a token classifier.

    ``path``: local dir with AutoModelForTokenClassification + its tokenizer. ``keep_label``: index of the
    "preserve" label (1 for LLMLingua-2). Text is cut into windows of ``max_length`` tokens, scored, and
    min-max normalised per window, as the Bingo release does per LLMLingua chunk.
    """

    def __init__(
        self,
        path: str,
        keep_label: int = 1,
        threshold: float = 0.5,
        normalize: str = "minmax",
        max_length: int = 512,
        batch_size: int = 16,
        device: str = "cpu",
    ):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path).to(device).eval()
        if not 0 <= keep_label < self.model.config.num_labels:
            raise ValueError(
                f"reward.bingo.scorer.keep_label={keep_label} but the classifier has {self.model.config.num_labels} labels"
            )
        self.keep_label, self.threshold, self.normalize = keep_label, threshold, normalize
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.no_grad()
    def __call__(self, responses, response_ids=None, metadata=None):
        out = []
        for text in responses:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = [ids[i : i + self.max_length - 2] for i in range(0, len(ids), self.max_length - 2)] or [[]]
            flags = []
            for start in range(0, len(windows), self.batch_size):
                group = windows[start : start + self.batch_size]
                width = max(len(w) for w in group)
                pad = self.tokenizer.pad_token_id or 0
                input_ids = torch.full((len(group), max(width, 1)), pad, dtype=torch.long)  # [windows, width]
                attention = torch.zeros_like(input_ids)
                for row, w in enumerate(group):
                    input_ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
                    attention[row, : len(w)] = 1
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
                keep = torch.softmax(logits.float(), dim=-1)[..., self.keep_label].cpu()  # [windows, width]
                for row, w in enumerate(group):
                    flags.append(_threshold(keep[row, : len(w)], self.threshold, self.normalize))
            out.append(torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool))
        return out
