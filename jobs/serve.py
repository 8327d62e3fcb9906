"""Serve a classifier over HTTP: `python jobs/serve.py MODEL [--port 8000] [--max-batch 32] [--max-wait-ms 5] [--top-k 3]`.

MODEL is what jobs/predict.py takes: a checkpoint (.pt, file or URL), or an ONNX (.onnx),
TorchScript (.torchscript.pt) or TFLite (.tflite) export; the format comes from --format or
the name, never from the contents. TorchScript, ONNX and TFLite files are programs: serve only
ones from a trusted source. The model is loaded once; concurrent requests are batched (up to
--max-batch images, waiting at most --max-wait-ms after the first), and images are prepared
exactly as predict prepares them.

    curl -F image=@shoe.png http://127.0.0.1:8000/predict          # multipart
    curl --data-binary @shoe.png 'http://127.0.0.1:8000/predict?top_k=5'   # raw bytes
    curl http://127.0.0.1:8000/health
    curl http://127.0.0.1:8000/metrics                              # Prometheus text

A body that is not an image, a truncated image or one over --max-body-mb gets a 4xx answer
with the reason; the server goes on. See imgcls/serving.py for the design.
"""
from __future__ import annotations

import sys

from imgcls.cli import entry_point
from jobs import ArgumentParser, add_device_argument
from imgcls.inference import MODEL_FORMATS, open_model


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("model", help="checkpoint (.pt), ONNX, TorchScript or TFLite export (trusted source only)")
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--max-batch", type=int, default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests after its first (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per answer unless ?top_k= (default: %(default)s)")
    parser.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body (default: %(default)s)")
    parser.add_argument("--format", choices=MODEL_FORMATS, default="", help="the model's format (default: from its name)")
    parser.add_argument("--data", default="", help="checkpoints only: shard dataset URL for the class names "
                                                   "(default: the checkpoint's data.url)")
    parser.add_argument("--threads", type=int, default=0, help="torch/onnxruntime/LiteRT threads; 0: their default")
    add_device_argument(parser)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.top_k < 1:
        parser.error("--max-batch and --top-k must be >= 1, --max-wait-ms >= 0")

    import uvicorn

    from imgcls.serving import create_app

    model = open_model(args.model, args.threads, args.data, args.format, args.device)
    app = create_app(model, args.model, args.max_batch, args.max_wait_ms, args.top_k, int(args.max_body_mb * 2**20))
    print(f"serving {args.model} ({model.kind}, {len(model.meta['classes'])} classes) on "
          f"http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
