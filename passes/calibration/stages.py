"""Split a captured graph into stages that run one after another, and run it stage by stage.

Sequential (block-by-block) calibration runs a model one block at a time over
all calibration batches, keeping only the values that cross from one block to
the next. This module is the graph side of it, for the blocks of
:mod:`passes.calibration.blocks`:

* :func:`plan_stages` assigns every node to a *stage*: the nodes of block ``i``
  form one stage, the nodes outside any block form the stages before the first
  block, between blocks and after the last one. Nodes that do not depend on the
  model's inputs (``get_attr``, ``weight * mask``) belong to no stage: they are
  evaluated when a stage reads them, so a stage always sees the current weights
  and masks. A stage records which values it must hand to later stages.
* :class:`StageRunner` runs one stage on one batch's carried values (an
  ``fx.Interpreter`` driven over the stage's nodes), evaluating on the way any
  node inserted after planning (calibration observers) in front of its user.

The graph is never modified here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import tree_leaves

from passes.calibration.blocks import module_stack
from passes.meta import get_sparse_target

__all__ = ["Stage", "StageRunner", "carried_bytes", "plan_stages", "stage_tensors"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A range of nodes run for all batches before the next stage starts.

    Attributes:
        name: the block's FQN, or ``"(before <first block>)"``, ``"(after <block>)"``.
        block: the block's FQN; ``None`` for the nodes outside every block.
        nodes: the nodes to run, in graph order.
        tensor_fqns: the masked weights whose linear/conv ops run in this stage.
        carried: the nodes whose values later stages read (this stage's and earlier ones').
    """

    name: str
    block: str | None
    nodes: tuple[fx.Node, ...]
    tensor_fqns: tuple[str, ...]
    carried: tuple[fx.Node, ...]


def _free_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that do not depend on a placeholder (parameters, ``weight * mask``, constants)."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module") and all(i in free for i in node.all_input_nodes)
        ):
            free.add(node)
    return free


def plan_stages(gm: fx.GraphModule, blocks: Sequence[str]) -> tuple[Stage, ...]:
    """Assign ``gm``'s nodes to stages: each block, and the nodes before, between and after them.

    A node recorded inside block ``b`` (its ``nn_module_stack`` holds ``b``) runs
    in ``b``'s stage. Any other node that depends on the inputs runs in the
    earliest stage its inputs allow: with the block its inputs come from when a
    node of that block reads it (a padding or reshaping node without module
    meta), else in the stage after that block. Empty stages are left out.

    Args:
        gm: a captured module.
        blocks: block FQNs (:func:`find_blocks`, :func:`match_blocks`); not nested.

    Returns:
        The stages in the order they run.

    Raises:
        ValueError: a block has no node in the graph, a block reads a value a
            later block computes (the blocks do not run one after another), or
            one masked weight is read by ops in two stages.
    """
    graph = gm.graph
    free = _free_nodes(graph)
    owner: dict[fx.Node, str] = {}
    first: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if node in free or node.op in ("placeholder", "output"):
            continue
        for path, _ in module_stack(node):
            if path in blocks:
                owner[node] = path
                first.setdefault(path, i)
                break
    missing = [b for b in blocks if b not in first]
    if missing:
        raise ValueError(f"blocks {missing} run no node of the graph that depends on the model's inputs")
    order = sorted(first, key=first.__getitem__)
    index = {b: 2 * i + 1 for i, b in enumerate(order)}  # block i is stage 2i+1; stage 2i+2 follows it

    live = [n for n in graph.nodes if n not in free and n.op != "output"]
    tentative: dict[fx.Node, int] = {}
    for node in live:
        deps = max((tentative[i] for i in node.all_input_nodes if i not in free), default=-1)
        if node.op == "placeholder":
            tentative[node] = -1
        elif node in owner:
            tentative[node] = index[owner[node]]
        else:
            tentative[node] = max(deps, 0)
    stage_of: dict[fx.Node, int] = {}
    for node in reversed(live):
        s = tentative[node]
        if node.op != "placeholder" and node not in owner and s % 2 == 1:
            users = [stage_of[u] for u in node.users if u in stage_of]
            s = s if s in users else s + 1
        stage_of[node] = s
    for node in live:
        if node.op == "placeholder":
            continue
        late = [i for i in node.all_input_nodes if i in stage_of and stage_of[i] > stage_of[node]]
        if late:
            raise ValueError(
                f"block {owner.get(node, '(outside blocks)')!r} reads {late[0].name}, computed later in "
                f"{_stage_name(stage_of[late[0]], order)!r}: the blocks do not run one after another; "
                "name blocks that do (blocks=[...])"
            )

    last_use = {n: max((stage_of[u] for u in n.users if u in stage_of), default=-1) for n in live}
    weights: dict[str, set[int]] = {}
    for node in live:
        target = get_sparse_target(node)
        if target is not None and target.role == "op":
            weights.setdefault(target.tensor_fqn, set()).add(stage_of[node])
    shared = {fqn: s for fqn, s in weights.items() if len(s) > 1}
    if shared:
        fqn, s = next(iter(shared.items()))
        raise ValueError(
            f"{fqn} is read by ops in {sorted(_stage_name(i, order) for i in s)}: a weight shared across blocks "
            "cannot be pruned block by block; exclude it from the config or name blocks that hold all its uses"
        )
    stages = []
    for s in range(0, 2 * len(order) + 1):
        nodes = tuple(n for n in live if stage_of[n] == s and n.op != "placeholder")
        if not nodes:
            continue
        fqns = tuple(f for f, where in weights.items() if s in where)
        carried = tuple(n for n in live if stage_of[n] <= s < last_use[n])
        block = order[(s - 1) // 2] if s % 2 else None
        stages.append(Stage(_stage_name(s, order), block, nodes, fqns, carried))
    return tuple(stages)


def _stage_name(s: int, order: Sequence[str]) -> str:
    if s % 2:
        return order[(s - 1) // 2]
    return f"(before {order[0]})" if s <= 0 else f"(after {order[s // 2 - 1]})"


def stage_tensors(gm: fx.GraphModule, stage: Stage) -> tuple[str, ...]:
    """The FQNs of the parameters and buffers ``stage`` reads: ``get_attr`` targets its nodes reach
    through input-independent nodes (``weight * mask``), and the tensors of the modules it calls.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
        >>> [stage] = plan_stages(gm, ["0"])
        >>> stage_tensors(gm, stage)
        ('0.bias', '0.weight')
    """
    free = _free_nodes(gm.graph)
    own = set(stage.nodes)
    seen: set[fx.Node] = set()
    fqns: list[str] = []
    todo = [a for n in stage.nodes for a in (n, *n.all_input_nodes)]
    while todo:
        node = todo.pop()
        if node in seen or (node not in own and node not in free):
            continue
        seen.add(node)
        if node in free:
            todo += node.all_input_nodes
        if node.op == "get_attr":
            fqns.append(node.target)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            prefix = f"{node.target}." if node.target else ""
            for name, _ in [*module.named_parameters(), *module.named_buffers()]:
                fqns.append(prefix + name)
    return tuple(dict.fromkeys(sorted(fqns)))


def carried_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct tensor storages among ``values`` (nested containers included)."""
    seen, total = set(), 0
    for leaf in tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            storage = leaf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


class StageRunner:
    """Runs the stages of ``gm`` (see :func:`plan_stages`) one batch at a time.

    Values of nodes that do not depend on the inputs (weights, ``weight * mask``)
    are computed when first read and kept until :meth:`forget_constants`: call
    it whenever weights or masks change. Nodes inserted after planning
    (observers in front of an op) are run when their user needs them.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> stages = plan_stages(gm, ["0", "2"])
        >>> [s.name for s in stages]
        ['0', '(after 0)', '2']
        >>> runner, x = StageRunner(gm), torch.randn(3, 4)
        >>> carried = runner.run(stages[0], runner.inputs((x,), {}))  # what the later stages read
        >>> torch.equal(list(carried.values())[0], gm.get_submodule("0")(x))
        True
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._free = _free_nodes(gm.graph)
        self._constants: dict[fx.Node, Any] = {}
        self._reader = _input_reader(gm)

    def inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
        """The placeholders' values for calling ``gm(*args, **kwargs)``.

        Raises:
            TypeError: the inputs do not fit ``gm``'s signature.
        """
        values = self._reader(*args, **kwargs)
        return dict(zip(self._placeholders, values, strict=True))

    def forget_constants(self) -> None:
        """Drop the cached values of input-independent nodes (weights or masks changed)."""
        self._constants.clear()

    def run(self, stage: Stage, env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        """Run ``stage``'s nodes on ``env`` (the values carried into it); return the values it carries out."""
        values = dict(env)
        interpreter = fx.Interpreter(self.gm, garbage_collect_values=False)
        interpreter.env = values
        for node in stage.nodes:
            self._run(interpreter, node, values, stage)
        return {n: values[n] for n in stage.carried}

    def _run(self, interpreter: fx.Interpreter, node: fx.Node, values: dict[fx.Node, Any], stage: Stage) -> None:
        for arg in node.all_input_nodes:
            if arg in values:
                continue
            if arg in self._constants:
                values[arg] = self._constants[arg]
            elif arg.op == "placeholder":
                raise RuntimeError(f"stage {stage.name!r} reads input {arg.name}, which was not carried into it")
            else:
                self._run(interpreter, arg, values, stage)
        try:
            values[node] = interpreter.run_node(node)
        except Exception as e:
            raise RuntimeError(f"stage {stage.name!r} failed at {node.format_node()}") from e
        if node in self._free:
            self._constants[node] = values[node]


def _input_reader(gm: fx.GraphModule) -> fx.GraphModule:
    """A module with ``gm``'s signature and input processing that returns the placeholders' values."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env.values()))
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    else:
        graph._codegen = CodeGen()
    return fx.GraphModule(nn.Module(), graph, "InputReader")
