"""Serve classifiers over HTTP: `python jobs/serve.py MODEL_OR_REPO [--port 8000] [--traffic NAME=1:0.9,2:0.1]`.

MODEL_OR_REPO is what jobs/predict.py takes (a checkpoint .pt, file or URL, or an ONNX, TorchScript
(.torchscript.pt) or TFLite export; the format comes from --format or the name, never from the
contents), served as model --name (default: the file's stem), version 1; or a folder laid out like
Triton's model repository, REPO/<name>/<version>/model.{onnx,tflite,torchscript.pt,pt}, where
new versions are picked up every --poll-s seconds (or on POST /v2/repository/index) and a broken
one is refused while the others keep serving. TorchScript, ONNX and TFLite files are programs:
serve only ones from a trusted source.

Concurrent requests are batched (up to --max-batch images, waiting at most --max-wait-ms after
the first), and images are prepared exactly as predict prepares them.

    curl -F image=@shoe.png http://127.0.0.1:8000/predict                  # multipart
    curl --data-binary @shoe.png 'http://127.0.0.1:8000/predict?top_k=5'  # raw bytes
    curl http://127.0.0.1:8000/v2/models/best                              # Open Inference Protocol v2
    curl http://127.0.0.1:8000/metrics                                     # Prometheus text
    open http://127.0.0.1:8000/                                            # a page to try it

Bad input gets a 4xx answer with the reason and the server goes on. Bind 127.0.0.1 and put a
reverse proxy in front when exposed (see the README). Design: imgcls/serving/.
"""
from __future__ import annotations

import sys

from imgcls.cli import entry_point
from imgcls.inference import MODEL_FORMATS, open_model
from jobs import ArgumentParser, add_device_argument


def build_parser() -> ArgumentParser:
    from imgcls.serving.app import SERVING_MAX_PIXELS

    parser = ArgumentParser(__doc__)
    parser.add_argument("model", help="a model file or URL (trusted source only), or a model repository folder")
    parser.add_argument("--name", default="", help="a single file's model name (default: the file's stem)")
    parser.add_argument("--traffic", action="append", default=[], metavar="NAME=V:W,V:W",
                        help="weighted split between versions, deterministic per request id; repeatable")
    parser.add_argument("--poll-s", type=float, default=5.0,
                        help="rescan the repository folder every N s; 0: only on POST /v2/repository/index "
                             "(default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--max-batch", type=int, default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests after its first (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per answer unless ?top_k= (default: %(default)s)")
    parser.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=SERVING_MAX_PIXELS,
                        help="largest image decoded, width x height (default: %(default)s)")
    parser.add_argument("--decode-workers", type=int, default=0, help="concurrent image decodes (default: the cores)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="images waiting to be decoded before 503 + Retry-After (default: %(default)s)")
    parser.add_argument("--read-timeout-s", type=float, default=30.0,
                        help="deadline for a request's headers, and for its body (default: %(default)s)")
    parser.add_argument("--limit-concurrency", type=int, default=256,
                        help="open connections and tasks before uvicorn answers 503 (default: %(default)s)")
    parser.add_argument("--window", type=int, default=1000,
                        help="answers and feedback labels in the monitoring window (default: %(default)s)")
    parser.add_argument("--alert-drop", type=float, default=3.0,
                        help="alert when live accuracy is this many points below validation (default: %(default)s)")
    parser.add_argument("--alert-min-feedback", type=int, default=100,
                        help="feedback labels needed before live accuracy counts (default: %(default)s)")
    parser.add_argument("--format", choices=MODEL_FORMATS, default="",
                        help="the model's format (default: from its name)")
    parser.add_argument("--data", default="", help="checkpoints only: shard dataset URL for the class names "
                                                   "(default: the checkpoint's data.url)")
    parser.add_argument("--threads", type=int, default=0, help="torch/onnxruntime/LiteRT threads; 0: their default")
    add_device_argument(parser)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.top_k < 1 or args.max_queue < 1 or args.window < 1:
        parser.error("--max-batch, --top-k, --max-queue and --window must be >= 1, --max-wait-ms >= 0")

    import logging

    import uvicorn

    from imgcls.distributed import resolve_device
    from imgcls.serving import Options, create_app
    from imgcls.serving.guards import deadline_protocol
    from imgcls.serving.repository import Repository, parse_traffic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        traffic = parse_traffic(args.traffic)
    except ValueError as e:
        parser.error(str(e))
    resolve_device(args.device, key="--device ")  # cuda without CUDA: one line before any model loads
    repo = Repository(args.model, lambda path: open_model(path, args.threads, args.data, args.format, args.device),
                      args.name, traffic)
    options = Options(args.max_batch, args.max_wait_ms, args.top_k, int(args.max_body_mb * 2**20),
                      args.read_timeout_s, args.max_pixels, args.decode_workers, args.max_queue, args.window,
                      args.alert_drop, args.alert_min_feedback, args.poll_s if repo.is_folder else 0)
    try:
        app = create_app(repo, options)
    except ValueError as e:  # nothing servable, or --traffic naming no model: one line
        parser.error(str(e))
    print(f"serving {', '.join(f'{v.name} v{v.version}' for v in app.state.initial)} on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=deadline_protocol(args.read_timeout_s),
                limit_concurrency=args.limit_concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
