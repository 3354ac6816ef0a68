"""The report's "left to the remainder": each claimed node once, each input it left once.

Treeification copies a shared node once per parent and per channel it enters; the
report (text and JSON) merges those copies instead of listing the node once per copy.
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import circuitlang
from circuitlang.verdict import remainder_by_node

# head 0.0 (with a child: the embedding into its value) is shared: it enters 1.0's key
# and query and 1.1's key, so the tree holds three copies of it.
SHARED = """\
task induction
metric loss
embed -> 0.0.v at all
0.0 -> 1.0.k at all
0.0 -> 1.0.q at all
0.0 -> 1.1.k at all
1.0 -> logits at all
1.1 -> logits at all
"""


def test_a_shared_node_is_listed_once_with_each_input_it_left_once(planted, induction_task):
    result = circuitlang.check(SHARED, model=planted, task=induction_task, n=8, permutations=0,
                               breakdown=False, max_examples=1)
    labels = [node for node, _ in result.remainder]
    assert labels == ["logits", "head 1.0 at all", "head 0.0 at all", "head 1.1 at all"]
    assert dict(result.remainder) == {
        "logits": ["stream: all but head 1.0 at all, head 1.1 at all"],
        "head 1.0 at all": ["q: all but head 0.0 at all", "k: all but head 0.0 at all", "v: all of it"],
        "head 0.0 at all": ["q: all of it", "k: all of it", "v: all but embed at all"],
        "head 1.1 at all": ["q: all of it", "k: all but head 0.0 at all", "v: all of it"],
    }
    text = result.render()
    section = text.split("left to the remainder")[1].split("\n\n")[0].splitlines()[1:]
    assert len(section) == 4 and len(set(section)) == 4, section
    assert Counter(line.split(":")[0].strip() for line in section) == Counter(labels)
    assert result.to_json()["remainder"] == {node: parts for node, parts in result.remainder}


def test_copies_that_differ_keep_each_part_once_and_say_how_many_read_it():
    site = SimpleNamespace(label_short=lambda: "head 0.0 at all")
    parts = {0: ["v: all of it"], 1: ["q: all of it", "v: all but embed at all"], 2: ["q: all of it"]}
    graph = SimpleNamespace(graph=SimpleNamespace(nodes=[2, 1, 0]), node=lambda v: site,
                            remainder_inputs=lambda v: parts[v])
    assert remainder_by_node(graph) == [("head 0.0 at all", [
        "q: all of it (in 2 of 3 copies)", "v: all of it (in 1 of 3 copies)",
        "v: all but embed at all (in 1 of 3 copies)"])]
