"""``diffprune export MODEL --format onnx --out DIR``: the denoiser (pruned or not) as an ONNX graph with a dynamic
batch, for ONNX Runtime, OpenVINO or TensorRT, checked against PyTorch with ONNX Runtime before it is written
(``DIR/model.onnx`` and ``DIR/export.json``: inputs, exporter, the measured difference). Needs
``pip install 'diffprune[export]'``."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..export import EXPORTERS, FORMATS

    p = sub.add_parser("export", help="export a denoiser to ONNX (checked with ONNX Runtime)", description=__doc__)
    p.add_argument("model", help="a model folder (pruned or not, bare or a pipeline), shipped name or hub id")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="the export format")
    p.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS,
                   help="torch's exporter: dynamo (torch.export), torchscript, or auto (dynamo, else torchscript)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed difference between ONNX Runtime's and PyTorch's outputs")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that diffprune wrote")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_model

    rec = export_model(args.model, args.out, fmt=args.format, exporter=args.exporter, opset=args.opset,
                       atol=args.atol, overwrite=args.overwrite)
    print(f"wrote {args.out}/model.onnx ({rec['exporter']} exporter; inputs {', '.join(rec['inputs'])}; ONNX Runtime "
          f"vs PyTorch max |diff| {rec['check']['max_abs_diff']:.2g} at batch {rec['check']['batch']})")
    return 0
