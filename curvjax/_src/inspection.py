"""What curvjax makes of a model: its taps, rules, curvature blocks and exact-Hessian support."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from curvjax._src import diagonals, leafwise, mixing, positions, primitives, quantities, rules
from curvjax._src import taps as taps_lib
from curvjax._src.blocks import DenseBlock, DiagonalBlock, KroneckerBlock, is_block

KRONECKER, DENSE, DIAGONAL = "kronecker", "dense", "diagonal"


@dataclasses.dataclass(frozen=True)
class TapReport:
    """One equation that consumes a parameter.

    Attributes:
      primitive: the JAX primitive's name (``dot_general``, ``conv_general_dilated``, ``add``, ...).
      where: the user's source line.
      rule: the per-example rule it uses: a fast rule's name (``dense``, ``conv``, a user rule)
        or ``"generic"`` (the equation's own VJP per example, exact for any operation).
    """

    primitive: str
    where: str
    rule: str


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """What curvjax computes for one parameter leaf.

    Attributes:
      name: the leaf's path, e.g. ``params['Dense_0']['kernel']``.
      shape: the leaf's shape.
      taps: the equations that consume it (several for tied weights; none for an unused leaf).
      block: the block kind of ``kfac`` / ``kflr`` / ``kfra``: ``"kronecker"`` (the kernel of a
        single dense or convolution tap), ``"dense"`` (a full block: biases, normalisation scales)
        or ``"diagonal"``; ``None`` for a non-floating-point leaf (held fixed).
      hessian_diag: ``None`` when the exact ``hessian_diag`` applies to the model, else why not
        (the equation that prevents it: this leaf's own tap if it is the cause, otherwise the
        first equation of the model that is).
    """

    name: str
    shape: tuple[int, ...]
    taps: tuple[TapReport, ...]
    block: str | None
    hessian_diag: str | None

    @property
    def rules(self) -> tuple[str, ...]:
        """The rule of each of the leaf's taps."""
        return tuple(t.rule for t in self.taps)


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """The result of :func:`curvjax.inspect`; ``print`` it for a table.

    Attributes:
      leaves: one :class:`LeafReport` per parameter leaf, in ``jax.tree.leaves`` order.
      hessian_issues: the equations that prevent the exact Hessian diagonal (empty if it applies).
      batch_mixing: the equations that combine examples of the batch (empty if none is found);
        when not empty every per-example quantity raises.
      unknown_primitives: primitives without a batch-mixing rule that receive batched data.
    """

    leaves: tuple[LeafReport, ...]
    hessian_issues: tuple[str, ...]
    batch_mixing: tuple[str, ...]
    unknown_primitives: tuple[str, ...]

    def __str__(self) -> str:
        header = ("leaf", "shape", "taps (primitive at line: rule)", "kfac block", "hessian_diag")
        rows = []
        for leaf in self.leaves:
            taps = "; ".join(f"{t.primitive} at {t.where}: {t.rule}" for t in leaf.taps) or "-"
            exact = "exact" if leaf.hessian_diag is None else "refused"
            rows.append((leaf.name, str(leaf.shape), taps, leaf.block or "-", exact))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.hessian_issues:
            lines.append("exact hessian_diag refused by: " + "; ".join(self.hessian_issues))
        if self.batch_mixing:
            lines.append("batch mixing (per-example quantities undefined):")
            lines += [f"  - {line}" for line in self.batch_mixing]
        if self.unknown_primitives:
            lines.append("no batch-mixing rule for: " + ", ".join(self.unknown_primitives))
        return "\n".join(line.rstrip() for line in lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython / Jupyter
        printer.text(str(self))


def _block_kinds(apply_fn, params, inputs, model) -> list[str]:
    """The block kind of every float leaf in ``kflr`` (traced with placeholder labels, not run);
    for a model that ``kflr`` refuses or cannot trace (it mixes examples, or a primitive has no
    batching rule), the layout of its single taps."""
    batch = positions.placeholder_batch(apply_fn, params, inputs)
    try:
        blocks = jax.eval_shape(
            lambda p: quantities.compute_one(
                "kflr", apply_fn, p, batch, loss="cross_entropy", reduction="sum"
            ),
            params,
        )
    except (ValueError, NotImplementedError):  # refused (mixing), or a primitive without vmap
        ndims = [jnp.ndim(leaf) for leaf in model.float_leaves(params)]
        fast, full, _ = leafwise.block_layout(model, ndims)
        return [
            KRONECKER if k in fast else DENSE if k in full else DIAGONAL
            for k in range(len(model.float_index))
        ]
    kind = {KroneckerBlock: KRONECKER, DenseBlock: DENSE, DiagonalBlock: DIAGONAL}
    return [kind[type(b)] for b in jax.tree.leaves(blocks, is_leaf=is_block)]


def inspect(apply_fn, params: Any, inputs: Any) -> ModelReport:
    """Show what curvjax makes of a model: per parameter leaf its taps, rules and block kind.

    ``apply_fn(params, inputs)`` is traced (no computation) at batch size one for the taps, and
    at the batch size of ``inputs`` for the batch-mixing check. For every leaf the report lists
    the equations that consume it (primitive, source line) with the per-example rule each uses
    (a fast rule or the generic per-example VJP, which is exact for any operation), the block kind
    ``kfac`` / ``kflr`` give it, and whether the exact ``hessian_diag`` applies, naming the
    equation that prevents it otherwise (use ``method="hutchinson"`` then).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      inputs: array or pytree of arrays with a leading batch axis ``N``.

    Returns:
      A :class:`ModelReport`; ``print(report)`` shows a table.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"][None]) @ p["w"].T
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
      >>> report = curvjax.inspect(apply_fn, params, jnp.ones((5, 4)))
      >>> [(leaf.name, leaf.rules, leaf.block) for leaf in report.leaves]
      [("params['b']", ('generic',), 'dense'), ("params['w']", ('dense', 'dense'), 'diagonal')]
      >>> report.hessian_issues  # tied weights included, the exact diagonal applies
      ()
    """
    model = taps_lib.TracedModel(apply_fn, params, inputs, residuals=True)
    issues = tuple(model.unsupported) + tuple(
        t.hessian_issue for t in model.taps if t.hessian_issue
    )
    cost = None if issues else diagonals.residual_cost_issue(model)
    issues += (cost,) if cost is not None else ()
    mixed, unknown = mixing.model_report(apply_fn, params, inputs)
    kinds = _block_kinds(apply_fn, params, inputs, model)
    float_position = {i: k for k, i in enumerate(model.float_index)}
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]
    reports = []
    for i, name in enumerate(model.leaf_names):
        k = float_position.get(i)
        if k is None:
            reports.append(LeafReport(name, shapes[i], (), None, None))
            continue
        taps = tuple(
            TapReport(
                tap.primitive,
                tap.where.split(" at ", 1)[1],
                primitives.rule_label(rules.fast_rule(tap)),
            )
            for tap in model.taps_of_leaf[k]
        )
        block = kinds[k]
        own = [t.hessian_issue for t in model.taps_of_leaf[k] if t.hessian_issue]
        exact = (own or list(issues) or [None])[0]
        reports.append(LeafReport(name, shapes[i], taps, block, exact))
    return ModelReport(tuple(reports), issues, tuple(mixed), tuple(unknown))
