"""Attention patterns: where chosen heads look on one prompt, with its tokens on the axes.

Takes a `LoadedModel`, one prompt (text, token ids, or one row of a task's `PromptSet`)
and heads (`Head(1, 2)` or `"1.2"`); gives a matplotlib `Figure` with one panel per
head: queries down the side, keys along the bottom, both labelled with the prompt's
tokens, probabilities from 0 (white) to 1. The patterns come from
`circuitlang.lens.attention_patterns` (the run engine's pattern capture).

In the SVG each panel's cells are the group `pattern-<layer>.<head>`, one path per
(query, key) pair in row-major order.
"""
from __future__ import annotations

from typing import Sequence


from circuitlang.figures._mpl import FigureError, new_figure
from circuitlang.figures.heatmaps import draw_grid

#: The sequential map of attention probabilities.
SEQUENTIAL = "Blues"


def _prompt_ids(model, prompt) -> list[int]:
    """Token ids of one prompt: text (tokenized without special tokens), ids, or a
    (PromptSet, index) pair (its real tokens, padding dropped)."""
    import torch

    if isinstance(prompt, tuple) and len(prompt) == 2 and hasattr(prompt[0], "input_ids"):
        prompts, i = prompt
        if not isinstance(i, int) or not 0 <= i < len(prompts):
            raise FigureError(f"prompt index {i!r} out of range", hint=f"the prompt set has 0-{len(prompts) - 1}")
        n = int(prompts.attention_mask[i].sum())
        return [int(t) for t in prompts.input_ids[i, :n]]
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise FigureError(f"model {model.name!r} has no tokenizer to read {prompt!r}",
                              hint="pass the prompt's token ids instead")
        ids = model.to_tokens(prompt)[0][0].tolist()
    else:
        ids = torch.as_tensor(prompt).reshape(-1).tolist() if not isinstance(prompt, list) else list(prompt)
    if not ids or not all(isinstance(t, int) for t in ids):
        raise FigureError(f"{prompt!r} is not a prompt", hint="pass text, a list of token ids, or (prompts, index)")
    vocab = model.shape.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise FigureError(f"token id {bad[0]} is outside the model's vocabulary",
                          hint=f"ids run from 0 to {vocab - 1}")
    return ids


def token_labels(model, ids: Sequence[int]) -> list[str]:
    """What to write on the axes for each token: its text (spaces shown as `·` at the
    ends), or the id when the model has no tokenizer; repeated labels stay as they are."""
    tok = model.tokenizer
    out = []
    for t in ids:
        text = str(t) if tok is None else tok.decode([t])
        stripped = text.strip()
        if not stripped:
            text = repr(text)
        elif stripped != text:
            text = text.replace(" ", "·")
        out.append(text.replace("$", r"\$"))
    return out


def attention_pattern(model, prompt, heads, *, annotate: bool | None = None):
    """The attention patterns of `heads` on one prompt, one panel per head.

    Args:
        model: a `LoadedModel`.
        prompt: the prompt's text, its token ids, or `(prompt_set, index)`.
        heads: one head or several: `Head(1, 2)`, `"1.2"`, `"head 1.2"`.
        annotate: write each probability in its cell (default: for short prompts).

    Returns:
        The matplotlib `Figure`.

    Raises:
        FigureError: an empty or unreadable prompt.
        ExecutionError: a head the model does not have.
    """
    from circuitlang.lens import attention_patterns

    one = isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(i, int) for i in heads)
    if one or isinstance(heads, str) or not isinstance(heads, Sequence):
        heads = [heads]
    ids = _prompt_ids(model, prompt)
    patterns = attention_patterns(model, [ids], heads)
    labels = token_labels(model, ids)
    t = len(ids)
    if annotate is None:
        annotate = t <= 10
    n = len(patterns)
    panel = min(6.0, 1.2 + 0.32 * t)
    fig = new_figure(panel * n + 0.9, panel + 0.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    from matplotlib.colors import Normalize  # after new_figure, which says when matplotlib is missing

    mesh = None
    for ax, (head, pattern) in zip(axes, patterns.items()):
        mesh = draw_grid(fig, ax, pattern[0], labels, labels, label="attention",
                         gid=f"pattern-{head.layer}.{head.head}", annotate=annotate,
                         norm=Normalize(0.0, 1.0), cmap=SEQUENTIAL, colorbar=False)
        ax.set_title(str(head), fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.tick_params(axis="x", labelrotation=90)
    fig.colorbar(mesh, ax=list(axes), shrink=0.9).set_label("attention")
    return fig


__all__ = ["SEQUENTIAL", "attention_pattern", "token_labels"]
