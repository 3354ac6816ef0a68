"""circuitlang's patching agrees with TransformerLens 4 and auto-circuit, to 1e-4.

Each test builds (once per session) a GPT-2-shaped random-init model folder with
`bench/peers/make_model.py`, runs the peer-side script inside its venv
(`.peers/tl`, `.peers/ac`, made by `bench/peers/setup.sh`) as a subprocess, and
compares its JSON with what `circuitlang.models.load_model(folder).run(...)` computes
on the same prompts. The metric everywhere is the logit difference (answer - wrong)
at the last position; the clean prompts are patched with corrupt-run values.

Marked `optional`: a test whose peer venv is missing is skipped with the command that
makes it.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from circuitlang.models import EdgePatch, Patch, load_model  # noqa: E402
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, Resid, Site  # noqa: E402

pytestmark = pytest.mark.optional

REPO = Path(__file__).resolve().parents[2]
PEERS_SRC = REPO / "bench" / "peers"
TL_PYTHON = REPO / ".peers" / "tl" / "bin" / "python"
AC_PYTHON = REPO / ".peers" / "ac" / "bin" / "python"
TOL = 1e-4
PEER_TIMEOUT_S = 900


def _skip_unless(python: Path, name: str) -> None:
    if not python.exists():
        pytest.skip(f"{name} venv not found at {python.parent.parent}; create it with "
                    f"`bench/peers/setup.sh {python.parent.parent.name}`")


class PeerJob:
    """A peer script running in its venv; `result()` waits for it and reads its JSON."""

    def __init__(self, python: Path, script: str, model: Path, out: Path, *flags: str):
        self.script, self.out = script, out
        self.proc = subprocess.Popen(
            [str(python), str(PEERS_SRC / script), str(model), str(model / "prompts.json"), str(out), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        self._result: dict | None = None

    def result(self) -> dict:
        if self._result is None:
            try:
                _, err = self.proc.communicate(timeout=PEER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                pytest.fail(f"{self.script} ran past {PEER_TIMEOUT_S} s")
            if self.proc.returncode != 0:
                pytest.fail(f"{self.script} failed (exit {self.proc.returncode}):\n{err[-4000:]}")
            self._result = json.loads(self.out.read_text())
        return self._result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# ---- the shared model and prompts --------------------------------------------------
@pytest.fixture(scope="session")
def peer_model(tmp_path_factory) -> Path:
    """A folder with a random-init GPT-2-shaped model, tokenizer and prompts.json."""
    spec = importlib.util.spec_from_file_location("peers_make_model", PEERS_SRC / "make_model.py")
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    folder = tmp_path_factory.mktemp("peer_model")
    make_model.build_model(folder, layers=2, heads=4, d_model=64, vocab=128, n_ctx=32, seed=0)
    # position 7 (not the last): single-position patches must reach the metric
    # through later positions' attention, which exercises position indexing.
    make_model.make_prompts(folder / "prompts.json", batch=6, tokens=10, vocab=128,
                            changed=3, seed=1, position=7)
    return folder


@pytest.fixture(scope="session")
def prompts(peer_model) -> dict:
    data = json.loads((peer_model / "prompts.json").read_text())
    return {k: torch.tensor(v) if isinstance(v, list) else v for k, v in data.items()}


@pytest.fixture(scope="session")
def lm(peer_model):
    return load_model(str(peer_model))


def logit_diff(logits: torch.Tensor, prompts: dict) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    last = logits[:, -1]
    return last[rows, prompts["answer"]] - last[rows, prompts["wrong"]]


@pytest.fixture(scope="session")
def runs(lm, prompts):
    """circuitlang's clean and corrupt runs, capturing every node site."""
    shape = lm.shape
    sites: list[Site] = [Embed()]
    for layer in range(shape.n_layers):
        sites += [Head(layer, h) for h in range(shape.n_heads)] + [Mlp(layer), Resid(layer)]
    clean = lm.run(prompts["clean"], capture=sites)
    corrupt = lm.run(prompts["corrupt"], capture=sites)
    return clean, corrupt


def patched(lm, prompts, patches=(), edges=None) -> torch.Tensor:
    return logit_diff(lm.run(prompts["clean"], patches=patches, edges=edges).logits, prompts)


def assert_close(ours, theirs, what: str) -> None:
    ours = torch.as_tensor(ours, dtype=torch.float64)
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    gap = (ours - theirs).abs().max().item()
    assert gap <= TOL, f"{what}: circuitlang {ours.tolist()} vs peer {theirs.tolist()} (max gap {gap:.2e})"


@pytest.fixture(scope="session")
def peer_jobs(peer_model, tmp_path_factory):
    """Start every available peer script at once (their start-up is mostly imports)."""
    out = tmp_path_factory.mktemp("peers")
    jobs: dict[str, PeerJob] = {}
    if TL_PYTHON.exists():
        jobs["tl"] = PeerJob(TL_PYTHON, "tl_patching.py", peer_model, out / "tl.json", "--path", "--no-timing")
    if AC_PYTHON.exists():
        jobs["ac"] = PeerJob(AC_PYTHON, "ac_edges.py", peer_model, out / "ac.json",
                             "--single", "--random-sets", "6", "--density", "0.15",
                             "--per-position", "--position-sets", "4", "--position-density", "0.05",
                             "--no-timing")
    yield jobs
    for job in jobs.values():
        job.stop()


# ---- TransformerLens 4 ------------------------------------------------------------
@pytest.fixture(scope="session")
def tl(peer_jobs) -> dict:
    _skip_unless(TL_PYTHON, "TransformerLens 4")
    return peer_jobs["tl"].result()


def test_tl_baselines(tl, lm, prompts, runs):
    clean, corrupt = runs
    assert_close(logit_diff(clean.logits, prompts), tl["results"]["clean_logit_diff"], "clean logit diff")
    assert_close(logit_diff(corrupt.logits, prompts), tl["results"]["corrupt_logit_diff"], "corrupt logit diff")
    # the prompts must actually move the metric, or agreement would be vacuous
    gap = (logit_diff(clean.logits, prompts) - logit_diff(corrupt.logits, prompts)).abs().max()
    assert gap > 0.05


def test_tl_head_out_at_one_position(tl, lm, prompts, runs):
    _, corrupt = runs
    pos = tl["position"]
    assert pos == 7
    batch = prompts["clean"].shape[0]
    positions = torch.full((batch,), pos)
    ours = [
        [patched(lm, prompts, [Patch(Head(l, h), corrupt.cache[Head(l, h)][:, pos], positions)]).tolist()
         for h in range(lm.shape.n_heads)]
        for l in range(lm.shape.n_layers)
    ]
    assert_close(ours, tl["results"]["head_out_pos_per_prompt"], "head output patched at one position")
    spread = torch.tensor(tl["results"]["head_out_pos"])
    assert spread.max() - spread.min() > 1e-3, "heads indistinguishable: test would be vacuous"


def test_tl_head_out_at_all_positions(tl, lm, prompts, runs):
    _, corrupt = runs
    ours = [
        [patched(lm, prompts, [Patch(Head(l, h), corrupt.cache[Head(l, h)])]).tolist()
         for h in range(lm.shape.n_heads)]
        for l in range(lm.shape.n_layers)
    ]
    assert_close(ours, tl["results"]["head_out_all_per_prompt"], "head output patched at every position")


def test_tl_resid_and_mlp(tl, lm, prompts, runs):
    _, corrupt = runs
    pos = tl["position"]
    positions = torch.full((prompts["clean"].shape[0],), pos)
    n = lm.shape.n_layers
    resid = [patched(lm, prompts, [Patch(Resid(l), corrupt.cache[Resid(l)][:, pos], positions)]).tolist()
             for l in range(n)]
    assert_close(resid, tl["results"]["resid_pre_pos_per_prompt"], "residual stream at one position")
    mlp_pos = [patched(lm, prompts, [Patch(Mlp(l), corrupt.cache[Mlp(l)][:, pos], positions)]).tolist()
               for l in range(n)]
    assert_close(mlp_pos, tl["results"]["mlp_out_pos_per_prompt"], "MLP output at one position")
    mlp_all = [patched(lm, prompts, [Patch(Mlp(l), corrupt.cache[Mlp(l)])]).tolist() for l in range(n)]
    assert_close(mlp_all, tl["results"]["mlp_out_all_per_prompt"], "MLP output at every position")


@pytest.mark.parametrize("channel", [Channel.Q, Channel.K, Channel.V])
def test_tl_path_patching(tl, lm, prompts, runs, channel):
    """One edge head -> later head's q/k/v carries the corrupt value (Wang et al. path patching).

    Every (sender, receiver) pair is one block of rows of a single batched run: the
    edge mask differs per row, which is how circuitlang evaluates many circuits per pass.
    """
    _, corrupt = runs
    n_layers, n_heads = lm.shape.n_layers, lm.shape.n_heads
    batch = prompts["clean"].shape[0]
    senders = tuple(Head(l, h) for l in range(n_layers) for h in range(n_heads))
    receivers = tuple(Head(l, h, channel) for l in range(n_layers) for h in range(n_heads))
    pairs = [(si, ri) for si, s in enumerate(senders) for ri, r in enumerate(receivers) if s.layer < r.layer]
    mask = torch.zeros(len(pairs), batch, len(receivers), len(senders))
    for k, (si, ri) in enumerate(pairs):
        mask[k, :, ri, si] = 1.0
    ablated = torch.stack([corrupt.cache[s] for s in senders], 1)  # [B, S, T, D]
    ids = prompts["clean"].repeat(len(pairs), 1)
    run = lm.run(ids, edges=EdgePatch(ablated.repeat(len(pairs), 1, 1, 1), mask.flatten(0, 1),
                                      senders, receivers))
    ours = logit_diff(run.logits, {**prompts, "answer": prompts["answer"].repeat(len(pairs)),
                                   "wrong": prompts["wrong"].repeat(len(pairs))}).view(len(pairs), batch)
    grid = tl["results"][f"path_{channel.value}"]
    theirs = [grid[senders[si].layer][senders[si].head][receivers[ri].layer][receivers[ri].head]
              for si, ri in pairs]
    assert_close(ours.mean(1), theirs, f"path patching into {channel.value}")
    assert max(theirs) - min(theirs) > 1e-3, "paths indistinguishable: test would be vacuous"


# ---- auto-circuit -----------------------------------------------------------------
_SITE = re.compile(r"head (\d+)\.(\d+)(?:\.([qkv]))?|mlp (\d+)|embed|logits")


def parse_site(text: str) -> Site:
    """circuitlang's printed form of a site, as the peer script writes it, back to a site."""
    m = _SITE.fullmatch(text)
    if m is None:
        raise ValueError(f"unexpected site {text!r}")
    if text == "embed":
        return Embed()
    if text == "logits":
        return Logits()
    if m.group(4) is not None:
        return Mlp(int(m.group(4)))
    head = Head(int(m.group(1)), int(m.group(2)))
    return head if m.group(3) is None else head.with_channel(Channel.parse(m.group(3)))


@pytest.fixture(scope="session")
def ac(peer_jobs) -> dict:
    """auto-circuit's results: the whole-sequence graph and the per-position graph."""
    _skip_unless(AC_PYTHON, "auto-circuit")
    return peer_jobs["ac"].result()


def _edge_mask(lm, es, ac: dict, chosen, batch: int, tokens: int | None) -> torch.Tensor:
    shape = (batch, len(es.receivers), len(es.senders)) if tokens is None else (
        batch, tokens, len(es.receivers), len(es.senders))
    mask = torch.zeros(shape)
    for i in chosen:
        e = ac["edges"][i]
        r, s = es.index(parse_site(e["sender"]), parse_site(e["receiver"]))
        if tokens is None:
            mask[:, r, s] = 1.0
        else:
            mask[:, e["pos"], r, s] = 1.0
    return mask


def _check_sets(lm, prompts, ac: dict, tokens: int | None) -> None:
    es = lm.edge_set()
    ablated = lm.run(prompts["corrupt"], capture=es.senders).cache
    batch = prompts["clean"].shape[0]
    for name, entry in ac["results"]["sets"].items():
        chosen = range(ac["n_edges"]) if entry["edges"] == "all" else entry["edges"]
        mask = _edge_mask(lm, es, ac, chosen, batch, tokens)
        ours = patched(lm, prompts, edges=EdgePatch(ablated, mask, es.senders, es.receivers))
        assert_close(ours, entry["per_prompt"], f"edge set {name!r} ({len(list(chosen))} edges)")


def test_ac_same_graph(ac, lm):
    """circuitlang's edge set is auto-circuit's factorized graph with separate q/k/v."""
    whole = ac["whole"]
    theirs = {(parse_site(e["sender"]), parse_site(e["receiver"])) for e in whole["edges"]}
    assert len(theirs) == whole["n_edges"]
    assert whole["hooked_vs_hf_max_logit_gap"] < 1e-4
    assert set(lm.edge_set().edges()) == theirs


def test_ac_edge_sets(ac, lm, prompts, runs):
    clean, corrupt = runs
    sets = ac["whole"]["results"]["sets"]
    assert_close(logit_diff(clean.logits, prompts), sets["none"]["per_prompt"], "no edge ablated")
    assert_close(logit_diff(corrupt.logits, prompts), sets["all"]["per_prompt"], "every edge ablated")
    _check_sets(lm, prompts, ac["whole"], None)


def test_ac_single_edges(ac, lm, prompts):
    """Every edge ablated alone: all of them in one run, one block of rows per edge."""
    ac = ac["whole"]
    es = lm.edge_set()
    n, batch = ac["n_edges"], prompts["clean"].shape[0]
    ablated = lm.run(prompts["corrupt"], capture=es.senders).cache
    mask = torch.cat([_edge_mask(lm, es, ac, [i], batch, None) for i in range(n)])
    stacked = torch.stack([ablated[s] for s in es.senders], 1).repeat(n, 1, 1, 1)
    run = lm.run(prompts["clean"].repeat(n, 1), edges=EdgePatch(stacked, mask, es.senders, es.receivers))
    ours = logit_diff(run.logits, {**prompts, "answer": prompts["answer"].repeat(n),
                                   "wrong": prompts["wrong"].repeat(n)}).view(n, batch).mean(1)
    assert_close(ours, ac["results"]["single"], "every edge ablated alone")
    assert max(ac["results"]["single"]) - min(ac["results"]["single"]) > 1e-2


def test_ac_edge_sets_per_position(ac, lm, prompts):
    section = ac["per_position"]
    tokens = prompts["clean"].shape[1]
    assert section["n_edges"] == lm.edge_set().valid().sum().item() * tokens
    sizes = [len(e["edges"]) for k, e in section["results"]["sets"].items() if k.startswith("random")]
    assert min(sizes) > 0
    _check_sets(lm, prompts, section, tokens)




# ---- the checker's experiments against TransformerLens -------------------------------
class _TokenTask:
    """A task over the peers' token-id prompts: logit difference at the last token."""

    from circuitlang.tasks.signature import TaskSignature

    SIGNATURE = TaskSignature("peer_tokens", ("P", "END"), (), ("logit_diff",), "logit_diff")

    def metric(self, name, logits, prompts, reference_logits=None):
        rows = torch.arange(logits.shape[0])
        if logits.dim() == 3:
            logits = logits[rows, prompts.positions["END"]]
        return logits[rows, prompts.answers[:, 0]] - logits[rows, prompts.wrong_answers[:, 0]]


def _prompt_set(prompts: dict):
    from circuitlang.tasks import PromptSet

    clean, corrupt = prompts["clean"], prompts["corrupt"]
    b, t = clean.shape
    ones = torch.ones_like(clean)
    names = tuple(str(i) for i in range(b))
    return PromptSet(
        task="peer_tokens", specs=names, texts=names, input_ids=clean, attention_mask=ones,
        positions={"P": torch.full((b,), int(prompts["position"])), "END": torch.full((b,), t - 1)},
        features={}, answers=prompts["answer"][:, None], wrong_answers=prompts["wrong"][:, None],
        corrupt_specs=names, corrupt_texts=names, corrupt_input_ids=corrupt,
        corrupt_attention_mask=ones,
    )


@pytest.mark.parametrize("where", ["P", "all"])
def test_tl_experiment_sweeps(tl, lm, prompts, where):
    """`patch head * at P` (the checker's batched, prefix-cached sweep) equals TransformerLens."""
    from circuitlang.experiments import Experiments
    from circuitlang.sites import ALL, Position

    shape = lm.shape
    heads = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    exp = Experiments(lm, _TokenTask(), _prompt_set(prompts), "logit_diff", batch_size=7)
    position = ALL if where == "all" else Position("P")
    ours = exp.activation_patching(heads, position).per_prompt.reshape(shape.n_layers, shape.n_heads, -1)
    key = "head_out_all_per_prompt" if where == "all" else "head_out_pos_per_prompt"
    assert_close(ours, tl["results"][key], f"experiment sweep at {where}")
