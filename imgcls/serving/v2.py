"""The Open Inference Protocol v2 routes (KServe v2 REST, as Triton serves it), so that
tritonclient.http works unchanged. Inputs, one per request, told apart by datatype:

    image   BYTES [N]            encoded JPEG, PNG or WebP files, one per batch row
    pixels  UINT8 [N, H, W, C]   raw pixels (C: 1 or 3), prepared as predict prepares an image
    input   FP32  [N, C, H, W]   already normalised, the model's own input

Outputs: `probabilities` FP32 [N, classes] (with Triton's `classification: k` parameter:
BYTES "prob:index:class" for the top k), `top_k` BYTES [N, k] class names (k: the request's
`top_k` parameter, else --top-k), `abnormal_score` FP32 [N] and `abnormal` BOOL [N] (models
exported with a reference). A multi-label model's probabilities are a sigmoid per class, and
it adds `labels` BYTES [N, classes]: each row the class names over the model's threshold
(metadata parameters `threshold`), most probable first, padded with empty strings. The
response's model_version says which version answered.
"""
from __future__ import annotations

import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from imgcls.serving import protocol
from imgcls.serving.guards import read_body
from imgcls.serving.repository import ModelVersion

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]


def metadata(name: str, versions: list[str], version: ModelVersion) -> dict:
    image, classes = version.meta["image"], version.meta["classes"]
    channels = image["channels"]
    return {
        "name": name, "versions": versions, "platform": f"imgcls_{version.model.kind}",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, channels]},
                   {"name": "input", "datatype": "FP32", "shape": [-1, channels, image["height"], image["width"]]}],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in output_specs(version)],
        "parameters": {"classes": classes,
                       **({"threshold": version.meta["threshold"]} if "threshold" in version.meta else {})},
    }


def output_specs(version: ModelVersion) -> list[tuple[str, str, list[int]]]:
    specs = [("probabilities", "FP32", [-1, len(version.meta["classes"])]), ("top_k", "BYTES", [-1, -1])]
    if version.meta.get("task") == "multilabel":
        specs.append(("labels", "BYTES", [-1, len(version.meta["classes"])]))
    if version.serving.monitor.threshold is not None:
        specs += [("abnormal_score", "FP32", [-1]), ("abnormal", "BOOL", [-1])]
    return specs


def v2_routes(server) -> APIRouter:
    repo = server.repo
    router = APIRouter(prefix="/v2")

    @router.get("")
    async def server_metadata():
        return {"name": "imgcls", "version": "1", "extensions": EXTENSIONS}

    @router.get("/health/live")
    async def live():
        return {"live": True}

    @router.get("/health/ready")
    async def ready():
        ok = bool(repo.models) and all(repo.models.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = ""):
        repo.pick(name, version)  # 404 when unknown or not servable
        return {"name": name, "ready": True}

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = ""):
        chosen = repo.pick(name, version)
        return metadata(name, [version] if version else sorted(repo.models[name], key=int), chosen)

    @router.post("/repository/index")
    async def repository_index():
        return await server.rescan()

    @router.post("/models/{name}/feedback")
    async def feedback(name: str, request: Request):
        body = await request.json()
        entries = body.get("feedback") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise protocol.ProtocolError('expected {"feedback": [{"id": ..., "label" or "labels": ...}]}')
        repo.pick(name)
        return server.feedback(name, entries)

    @router.post("/models/{name}/infer")
    @router.post("/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = ""):
        body = await read_body(request, server.options.max_body_bytes, server.options.read_timeout_s)
        header, binary = protocol.split_body(body, request.headers.get(protocol.HEADER_LENGTH.lower()))
        request_id = str(header.get("id") or "")
        chosen = repo.pick(name, version, request_id)
        request_id = request_id or uuid.uuid4().hex  # returned, so that feedback can name it
        async with server.measured(chosen):
            images = await model_inputs(server, chosen, protocol.read_inputs(header, binary))
            answers = await server.infer(chosen, images, request_id)
            outputs = encode_outputs(chosen, header, answers, server.options.top_k)
        head = {"model_name": chosen.name, "model_version": chosen.version, "id": request_id,
                "parameters": {"abnormal_threshold": chosen.serving.monitor.threshold}}
        content, headers = protocol.encode_response(head, outputs)
        return Response(content, media_type="application/octet-stream" if headers else "application/json",
                        headers=headers)

    return router


async def model_inputs(server, version: ModelVersion, tensors: list) -> list[np.ndarray]:
    """The request's one input as normalised [C, H, W] images, one per batch row."""
    if len(tensors) != 1:
        raise protocol.ProtocolError(f"{len(tensors)} inputs; send exactly one of image (BYTES), pixels (UINT8) "
                                     f"or input (FP32)")
    name, datatype, shape, data = tensors[0]
    image = version.meta["image"]
    if datatype == "BYTES":
        return await server.decode_all(version, server._decode, list(data))
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise protocol.ProtocolError(f"input {name!r}: UINT8 pixels must be [N, H, W, C] with C 1 or 3, "
                                         f"not {shape}")
        if shape[1] * shape[2] > server.options.max_pixels:
            raise protocol.ProtocolError(f"input {name!r}: {shape[2]}x{shape[1]} pixels, more than the "
                                         f"{server.options.max_pixels:,} allowed")
        return await server.decode_all(version, server._from_pixels, list(data))
    want = [image["channels"], image["height"], image["width"]]
    if datatype != "FP32" or len(shape) != 4 or shape[1:] != want:
        raise protocol.ProtocolError(f"input {name!r}: {datatype} {shape}; expected BYTES [N], UINT8 [N,H,W,C] or "
                                     f"FP32 [N,{','.join(map(str, want))}]")
    return list(np.asarray(data, np.float32))


def encode_outputs(version: ModelVersion, header: dict, answers: list, default_k: int) -> list:
    classes = version.meta["classes"]
    probs = np.stack([p for p, _ in answers])
    k = int((header.get("parameters") or {}).get("top_k", default_k))
    order = np.argsort(-probs, axis=1)[:, :min(max(k, 1), len(classes))]
    available = [name for name, _, _ in output_specs(version)]
    outputs = []
    for name, params in protocol.requested_outputs(header, available):
        binary = bool(params["binary_data"])
        if name == "probabilities" and params.get("classification"):
            top = np.argsort(-probs, axis=1)[:, :int(params["classification"])]
            labels = [[f"{p[i]:f}:{i}:{classes[i]}".encode() for i in row] for p, row in zip(probs, top)]
            outputs.append((name, "BYTES", labels, binary))
        elif name == "probabilities":
            outputs.append((name, "FP32", probs, binary))
        elif name == "top_k":
            outputs.append((name, "BYTES", [[classes[i].encode() for i in row] for row in order], binary))
        elif name == "labels":
            over = [[classes[i].encode() for i in row if p[i] >= version.meta["threshold"]]
                    for p, row in zip(probs, np.argsort(-probs, axis=1))]
            outputs.append((name, "BYTES", [row + [b""] * (len(classes) - len(row)) for row in over], binary))
        elif name == "abnormal_score":
            outputs.append((name, "FP32", [v["score"] for _, v in answers], binary))
        else:
            outputs.append((name, "BOOL", [bool(v["flagged"]) for _, v in answers], binary))
    return outputs
