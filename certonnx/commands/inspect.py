"""``certonnx inspect MODEL``: what the model is, what ε means for it, and what we can bound.

Answers the questions to ask before certifying: does it import faithfully (parity with
onnxruntime), what is its input space (normalization inside or not), which ONNX ops it uses and
which bound methods can handle each, and, for a model certonnx exported, the certificate it
carries.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from certonnx.commands.options import json_flag_option
from certonnx.errors import CertonnxError

METHODS_FALLBACK = ("ibp", "crown-ibp", "crown", "alpha-crown")


def _support(model: Any) -> tuple[dict[str, dict[str, bool | None]] | None, dict[str, Any], tuple[str, ...]]:
    """``(fx-level support table or None, per-ONNX-op support, methods)``.

    Per ONNX op the value is ``{method: bool}``, ``"constant"`` (its nodes do not depend on the
    input, nothing to bound), ``"removed"`` (folded or removed at import) or ``None`` (unknown:
    the bound registry is not available), ``"head"`` (the final softmax, set aside at import).
    """
    try:
        from certonnx.bounds.registry import METHODS, node_label, support_table
    except ImportError:
        return None, {op: None for op in model.onnx_ops}, METHODS_FALLBACK
    try:
        table: dict[str, dict[str, bool | None]] = support_table(model.module, model.sample_shape)  # type: ignore[assignment]
    except CertonnxError:
        raise
    except Exception:  # noqa: BLE001 - a broken registry must not break inspect
        return None, {op: None for op in model.onnx_ops}, tuple(METHODS)
    gm = model.module
    per_op: dict[str, Any] = {}
    for node in gm.graph.nodes:
        op = node.meta.get("onnx_op_type")
        if op is None:
            continue
        op = fused_name(op)
        try:
            label = node_label(node, gm)
        except Exception:  # noqa: BLE001
            label = None
        row = table.get(label) if label is not None else None
        cur = per_op.get(op)
        if row is None:
            per_op.setdefault(op, "constant")
            continue
        if not isinstance(cur, dict):
            per_op[op] = dict(row)
        else:
            for m in METHODS:
                cur[m] = bool(cur.get(m)) and bool(row.get(m))
    if model.head is not None:
        # set aside at import (certified on the logits before it), unless the op also occurs inside
        per_op.setdefault(model.head.op, "head")
    for op in model.onnx_ops:
        per_op.setdefault(op, "removed")
    return table, per_op, tuple(METHODS)


#: suffix of the ops that import creates from a pattern of the file's ops (GELU from Erf, Mul,
#: Add; see certonnx.io.passes), which the file itself does not name
FUSED = " (fused at import)"


def fused_name(op: str) -> str:
    """The table's name of an op as import recorded it: ``com.microsoft:Gelu`` (the contrib op
    the GELU passes emit) is ``Gelu (fused at import)``; the file's own ops keep their names."""
    return op.split(":", 1)[1] + FUSED if op.startswith("com.microsoft:") else op


def _fused_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.module.graph.nodes:
        op = node.meta.get("onnx_op_type")
        if op is not None and fused_name(op).endswith(FUSED):
            counts[fused_name(op)] = counts.get(fused_name(op), 0) + 1
    return counts


def _unsupported(per_op: dict[str, Any], table: dict[str, dict[str, bool | None]] | None) -> list[str]:
    """Ops no bound method can handle (fx-level labels included, for ops we could not map)."""
    bad = [op for op, row in per_op.items() if isinstance(row, dict) and not any(row.values())]
    if table is not None:
        bad += [f"{lab} (torch)" for lab, row in table.items() if not any(row.values())]
    return sorted(set(bad))


def collect(path: str, *, parity: bool = True) -> dict[str, Any]:
    """Everything ``inspect`` reports, as one JSON-serialisable dict."""
    import onnx

    from certonnx.io.load import load, read_model
    from certonnx.io.metadata import read_certificate

    model = load(path, check_parity=parity)
    src = read_model(path)
    params = [p for p in model.module.parameters()]
    n_params = int(sum(p.numel() for p in params if p.requires_grad))

    def shape_of(vi: onnx.ValueInfoProto) -> list[int | str | None]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
        ]

    inits = {t.name for t in src.graph.initializer}
    inputs = [
        {"name": i.name, "shape": shape_of(i),
         "dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()}
        for i in src.graph.input if i.name not in inits
    ]
    outputs = [
        {"name": o.name, "shape": shape_of(o),
         "dtype": onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type).lower()}
        for o in src.graph.output
    ]
    table, per_op, methods = _support(model)
    space = model.input_space()
    eps_meaning = (
        f"ε is measured on raw inputs in [{model.domain[0]:g}, {model.domain[1]:g}] "
        "(before the model's own normalization)"
        if model.normalization is not None
        else f"ε is measured on the model's input, assumed in [{model.domain[0]:g}, {model.domain[1]:g}]; "
        "if it expects normalized input, pass --mean/--std"
    )
    cert = read_certificate(src)
    return {
        "path": str(path),
        "producer": model.producer,
        "opset": model.opset,
        "ir_version": int(src.ir_version),
        "inputs": inputs,
        "outputs": outputs,
        "imported": {
            "input_shape": list(model.input_shape),
            "output_shape": list(model.output_shape),
            "num_classes": model.num_classes,
        },
        "parameters": n_params,
        "normalization": model.normalization.to_dict() if model.normalization else None,
        "head": model.head.describe() if model.head is not None else None,
        "input_space": space,
        "eps_meaning": eps_meaning,
        "parity_max_abs_diff": model.parity_max_abs_diff,
        "import_notes": list(getattr(model.module, "meta", {}).get("certonnx_import_notes", [])),
        "ops": [
            {"op": op, "count": cnt, "support": per_op.get(op)}
            for op, cnt in sorted({**model.onnx_ops, **_fused_counts(model)}.items())
        ],
        "methods": list(methods),
        "support_table": table,
        "unsupported": _unsupported(per_op, table) if table is not None else None,
        "metadata": {k: v for k, v in model.metadata.items() if k != "certonnx.certificate"},
        "certificate": cert,
    }


def _cell(row: Any, m: str) -> str:
    if row is None:
        return "?"
    if row == "constant":
        return "[dim]const[/dim]"
    if row == "removed":
        return "[dim]import[/dim]"
    if row == "head":
        return "[dim]head[/dim]"
    return "[green]yes[/green]" if row.get(m) else "[red]no[/red]"


def render(info: dict[str, Any]) -> None:
    """Rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"certonnx inspect {info['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("producer", info["producer"] or "?")
    t.add_row("opset / IR", f"{info['opset']} / {info['ir_version']}")
    for i in info["inputs"]:
        t.add_row("input", f"{i['name']}  {i['shape']}  {i['dtype']}")
    for o in info["outputs"]:
        t.add_row("output", f"{o['name']}  {o['shape']}  {o['dtype']}")
    t.add_row("imported as", f"{info['imported']['input_shape']} -> {info['imported']['output_shape']} "
              f"({info['imported']['num_classes']} classes), batch dynamic")
    t.add_row("parameters", f"{info['parameters']:,}")
    norm = info["normalization"]
    along = f" per channel of input axis {norm['axis']}" if norm is not None and norm.get("axis") is not None else ""
    t.add_row("normalization", "none found in the graph" if norm is None else
              f"(x - {norm['mean']}) / {norm['std']}{along} inside the model")
    if info.get("head"):
        t.add_row("head", info["head"])
    t.add_row("ε means", info["eps_meaning"])
    d = info["parity_max_abs_diff"]
    t.add_row("parity vs onnxruntime", "not checked" if d is None else f"max abs diff {d:.2e} (ok)")
    if info["import_notes"]:
        t.add_row("import passes", "; ".join(info["import_notes"]))
    for k, v in info["metadata"].items():
        t.add_row(f"metadata {k}", v if len(v) < 80 else v[:77] + "...")
    con.print(t)

    ops = Table(title="ONNX ops and bound support", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for m in info["methods"]:
        ops.add_column(m, justify="center")
    for row in info["ops"]:
        ops.add_row(row["op"], str(row["count"]), *[_cell(row["support"], m) for m in info["methods"]])
    con.print(ops)
    con.print("[dim]const: no input dependence, nothing to bound; import: folded or removed when importing; "
              "head: the final softmax, certified on the logits before it; ?: bound registry unavailable[/dim]")
    if info["unsupported"]:
        con.print(f"[red]unsupported by every bound method:[/red] {', '.join(info['unsupported'])}")

    cert = info["certificate"]
    if cert:
        c = Table(title="certificate (metadata certonnx.certificate)", show_header=False, title_justify="left")
        c.add_column(style="bold")
        c.add_column()
        c.add_row("schema", str(cert.get("schema")))
        c.add_row("created", f"{cert.get('created')} by certonnx {cert.get('certonnx_version')}")
        c.add_row("method / verifier", f"{cert.get('method')} / {cert.get('verifier')}")
        c.add_row("samples", f"{cert.get('n')} (dataset sha256 {str(cert.get('dataset_sha256'))[:16]}...)")
        c.add_row("clean accuracy", f"{cert.get('clean_accuracy', float('nan')):.4f}")
        for k, eps in (cert.get("norms") or {}).items():
            acc = (cert.get("certified_accuracy") or {}).get(k)
            pgd = (cert.get("pgd_accuracy") or {}).get(k)
            extra = f", PGD {pgd:.4f}" if pgd is not None else ""
            c.add_row(f"certified {k} ε={eps:g}", f"{acc:.4f}{extra}" if acc is not None else "?")
        if cert.get("union_certified_accuracy") is not None:
            c.add_row("certified for all norms", f"{cert['union_certified_accuracy']:.4f}")
        prob = cert.get("probabilistic")
        if prob:
            c.add_row("probabilistic", f"randomized smoothing, σ {prob.get('sigma')}, α {prob.get('alpha')}: the "
                      "smoothed classifier, not the model alone (check --require smoothed-...)")
            c.add_row("smoothed accuracy", f"{prob.get('smoothed_accuracy', float('nan')):.4f}")
            for k, eps in (prob.get("norms") or {}).items():
                acc = (prob.get("certified_accuracy") or {}).get(k)
                c.add_row(f"smoothed certified {k} ε={eps:g}", f"{acc:.4f}" if acc is not None else "?")
        c.add_row("weights fingerprint",
                  "[green]matches the weights[/green]" if cert.get("weights_match")
                  else "[red]does NOT match the weights in this file[/red]")
        gm = cert.get("graph_match")
        c.add_row("graph fingerprint",
                  "[dim]not stored (older certificate)[/dim]" if gm is None
                  else "[green]matches the graph[/green]" if gm
                  else "[red]does NOT match the graph in this file[/red]")
        con.print(c)


@click.command("inspect")
@click.argument("model", type=str)
@json_flag_option("Print one JSON object on stdout instead of tables.")
@click.option("--strict", is_flag=True, help="Exit 1 when some op cannot be bounded by any method.")
@click.option("--no-parity", is_flag=True, help="Skip the torch vs onnxruntime parity check (faster).")
def command(model: str, as_json: bool, strict: bool, no_parity: bool) -> int:
    """Show a model's inputs, outputs, normalization, ops and which bound methods support them.

    \b
    certonnx inspect model.onnx
    certonnx inspect model.onnx --json | jq .ops
    certonnx inspect model.onnx --strict   # exit 1 if an op cannot be bounded

    Also shows the certificate stored by `certonnx finetune`/`certify -o` when present.
    """
    info = collect(model, parity=not no_parity)
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
    else:
        render(info)
    if strict:
        if info["unsupported"] is None:
            click.echo("error: cannot check op support (bound registry unavailable)", err=True)
            return 1
        if info["unsupported"]:
            click.echo(f"error: unsupported ops: {', '.join(info['unsupported'])}", err=True)
            return 1
    return 0
