"""jobs/serve.py as a real server process on 127.0.0.1, with a real HTTP client (httpx):
concurrent requests batched and answered as jobs/predict.py answers, for every model format;
bad input answered with a 4xx and the reason; a slow client does not hold up the others."""
from __future__ import annotations

import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgcls.export import export_checkpoint, read_samples
from imgcls.inference import read_meta
from tests.conftest import job, save_test_images, serving, wait_until


@pytest.fixture(scope="module")
def models(bands_checkpoint, tmp_path_factory) -> dict[str, str]:
    """The trained model in every format the server takes."""
    out = tmp_path_factory.mktemp("serve-models")
    paths = {"checkpoint": bands_checkpoint}
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.torchscript.pt"), ("tflite", "m.tflite")):
        paths[fmt] = export_checkpoint(bands_checkpoint, fmt, out / name, check_samples=10)["path"]
    return paths


@pytest.fixture(scope="module")
def images(models, tmp_path_factory) -> list:
    meta = read_meta(models["onnx"])
    test_images, _ = read_samples(meta, "test", 12)
    return save_test_images(tmp_path_factory.mktemp("serve-images"), test_images, meta, 12)


def predict_answers(model: str, images: list) -> dict[str, list[dict]]:
    """jobs/predict.py's top-3 for each image: what the server must answer."""
    _, _, code = job("predict", model, *map(str, images), "--top-k", "3", "--output", str(images[0].parent / "p.json"))
    assert code == 0
    rows = json.loads((images[0].parent / "p.json").read_text())["predictions"]
    return {row["path"]: row["top_k"] for row in rows}


def post(url: str, path, multipart: bool) -> httpx.Response:
    data = path.read_bytes()
    if multipart:
        return httpx.post(url + "/predict", files={"image": (path.name, data, "image/png")}, timeout=30)
    return httpx.post(url + "/predict", content=data, headers={"content-type": "application/octet-stream"}, timeout=30)


def metrics(url: str) -> dict[str, dict]:
    """{sample name: {labels as a sorted tuple: value}} parsed by prometheus_client's own parser."""
    parsed = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return parsed


@pytest.mark.parametrize("fmt", ["checkpoint", "onnx", "torchscript", "tflite"])
def test_concurrent_requests_are_batched_and_answered_like_predict(fmt, models, images):
    expected = predict_answers(models[fmt], images)
    requests = [(images[i % len(images)], i % 2 == 0) for i in range(24)]  # multipart and raw, alternately
    with serving(models[fmt], "--max-batch", "8", "--max-wait-ms", "100") as url:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda r: post(url, *r), requests))
        health = httpx.get(url + "/health").json()
        seen = metrics(url)
    assert health["status"] == "ok" and health["classes"] == 4
    for (path, _), answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        top = answer.json()["top_k"]
        want = expected[str(path)]
        assert [t["class"] for t in top] == [t["class"] for t in want]
        assert np.allclose([t["prob"] for t in top], [t["prob"] for t in want], atol=1e-5)
    assert seen["imgcls_requests_total"][(("status", "200"),)] == 24
    batches = seen["imgcls_batch_size_count"][()]
    assert seen["imgcls_batch_size_sum"][()] == 24 and batches < 24, "no two requests were batched"
    assert seen["imgcls_batch_size_bucket"][(("le", "8.0"),)] == batches  # never above --max-batch
    p50 = seen["imgcls_request_latency_recent_seconds"][(("quantile", "0.5"),)]
    p99 = seen["imgcls_request_latency_recent_seconds"][(("quantile", "0.99"),)]
    assert 0 < p50 <= p99 < 30


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_gets_a_4xx_with_the_reason_and_the_server_goes_on(models, images):
    good = images[0].read_bytes()
    cases = {  # body, multipart?, status, words of the reason
        "text": (b"hello, not an image", False, 400, "not an image"),
        "truncated": (good[:len(good) // 2], False, 400, "truncated"),
        "empty": (b"", False, 400, "empty"),
        "oversized": (b"\0" * 30_000, False, 413, "more than the 20971 allowed"),
        "no file field": (None, True, 400, "without a file field"),
        "malformed multipart": (b"--x\r\nnot a part", "boundary=x", 400, "Invalid multipart data"),
        "decompression bomb": (png_of_size(9000, 9000), False, 400, "9000x9000 pixels"),
    }
    with serving(models["onnx"], "--max-body-mb", "0.02") as url:
        for name, (body, multipart, status, reason) in cases.items():
            if multipart == "boundary=x":
                answer = httpx.post(url + "/predict", content=body,
                                    headers={"content-type": "multipart/form-data; boundary=x"})
            elif multipart:
                answer = httpx.post(url + "/predict", files={"note": (None, "no image here")})
            else:
                answer = httpx.post(url + "/predict", content=body)
            assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text}"
            assert reason in answer.json()["error"].replace(",", ""), f"{name}: {answer.text}"
        assert httpx.post(url + "/predict?top_k=0", content=good).status_code == 422
        answer = httpx.post(url + "/predict?top_k=1", content=good)
        assert answer.status_code == 200 and len(answer.json()["top_k"]) == 1
        assert metrics(url)["imgcls_requests_total"][(("status", "400"),)] == 6


def test_a_slow_client_does_not_block_the_others(models, images):
    good = images[0].read_bytes()
    with serving(models["onnx"]) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            # headers and a tenth of the body, then silence
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(good)
                         + good[:len(good) // 10])
            start = time.perf_counter()
            answers = [httpx.post(url + "/predict", content=good, timeout=10) for _ in range(5)]
            elapsed = time.perf_counter() - start
            assert all(a.status_code == 200 for a in answers) and elapsed < 5
            slow.sendall(good[len(good) // 10:])  # the slow client still gets its answer
            slow.settimeout(10)
            reply = b""
            while b"}]}" not in reply and (chunk := slow.recv(65536)):  # headers and body may come apart
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"top_k"' in reply


# ---- the Open Inference Protocol v2, through tritonclient -----------------------------
def test_tritonclient_reads_metadata_and_infers_like_predict(models, images):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    expected = predict_answers(models["onnx"], images)
    files = [p.read_bytes() for p in images[:6]]
    pixels = np.stack([np.asarray(Image.open(p))[:, :, None] for p in images[:6]])  # [N,H,W,1] uint8
    with serving(models["onnx"], "--name", "bands", "--max-wait-ms", "100") as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"), concurrency=8)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("bands")
        assert not client.is_model_ready("nope")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("bands")
        assert meta["versions"] == ["1"] and client.get_model_metadata("bands", "1")["name"] == "bands"
        assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8"),
                                                                         ("input", "FP32")}
        assert ["probabilities", "FP32", [-1, 4]] in [[o["name"], o["datatype"], o["shape"]] for o in meta["outputs"]]

        answers = {}
        for datatype, data in (("BYTES", np.array(files, dtype=object)), ("UINT8", pixels)):
            tensor = triton.InferInput("image" if datatype == "BYTES" else "pixels", list(data.shape), datatype)
            tensor.set_data_from_numpy(data, binary_data=True)  # the binary tensor extension
            outputs = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("top_k")]
            answers[datatype] = client.infer("bands", [tensor], outputs=outputs, request_id=f"req-{datatype}",
                                             parameters={"top_k": 3})
        json_input = triton.InferInput("image", [1], "BYTES")
        json_input.set_data_from_numpy(np.array([files[0]], dtype=object), binary_data=True)
        classified = client.infer("bands", [json_input], model_version="1",
                                  outputs=[triton.InferRequestedOutput("probabilities", binary_data=False,
                                                                       class_count=2)])
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.infer("nope", [json_input])
        before = metrics(url)["imgcls_batch_size_count"][()]
        pending = [client.async_infer("bands", [json_input]) for _ in range(16)]  # 8 connections at once
        assert all(p.get_result().as_numpy("top_k")[0][0] == answers["BYTES"].as_numpy("top_k")[0][0] for p in pending)
        # (batching across clients is asserted by test_concurrent_requests_are_batched_and_answered_like_predict;
        # here, under a loaded machine, 16 async requests may arrive one at a time)
        assert metrics(url)["imgcls_batch_size_count"][()] - before <= 16
        bad = triton.InferInput("input", [1, 1, 5, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 5, 5), np.float32))
        with pytest.raises(InferenceServerException, match=r"expected .*FP32 \[N,1,12,12\]"):
            client.infer("bands", [bad])
        client.close()

    for datatype, result in answers.items():
        response = result.get_response()
        assert response["model_name"] == "bands" and response["model_version"] == "1"
        assert response["id"] == f"req-{datatype}"
        probs, names = result.as_numpy("probabilities"), result.as_numpy("top_k")
        assert probs.shape == (6, 4) and names.shape == (6, 3)
        for path, row, top in zip(images, probs, names):
            want = expected[str(path)]
            assert [n.decode() for n in top] == [t["class"] for t in want], datatype
            assert np.allclose(sorted(row, reverse=True)[:3], [t["prob"] for t in want], atol=1e-5)
    best = expected[str(images[0])][0]
    top1 = str(classified.as_numpy("probabilities")[0][0])  # JSON output: a str
    assert top1.endswith(f":{best['index']}:{best['class']}")


# ---- a model repository: versions, traffic, reload ------------------------------------
def add_version(repo, name: str, version: int, model: str | None) -> None:
    """REPO/name/version/model.onnx (+ its sidecar), moved in whole; garbage when model is None."""
    staging = repo.parent / f"staging-{name}-{version}"
    staging.mkdir(parents=True)
    if model:
        shutil.copy(model, staging / "model.onnx")
        shutil.copy(model + ".json", staging / "model.onnx.json")
    else:
        (staging / "model.onnx").write_bytes(b"not an onnx file")
    (repo / name).mkdir(parents=True, exist_ok=True)
    staging.rename(repo / name / str(version))


def test_repository_versions_traffic_split_metrics_and_reload(models, images, tmp_path):
    import tritonclient.http as triton

    repo = tmp_path / "repo"
    for version in (1, 2):
        add_version(repo, "bands", version, models["onnx"])
    good = images[0].read_bytes()
    with serving(str(repo), "--traffic", "bands=1:0.75,2:0.25", "--poll-s", "0.5", log=tmp_path / "log") as url:
        def answer(request_id, **params):
            reply = httpx.post(url + "/predict", params=params, content=good, headers={"x-request-id": request_id})
            assert reply.status_code == 200, reply.text
            return reply.json()["version"]

        chosen = {i: answer(f"client-{i}") for i in range(60)}
        assert all(answer(f"client-{i}") == chosen[i] for i in range(10)), "a client moved to another version"
        assert 0.1 < list(chosen.values()).count("2") / len(chosen) < 0.4
        assert answer("x", version="1") == "1"
        assert httpx.post(url + "/predict?version=2", content=b"garbage").status_code == 400

        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([good], dtype=object))
        assert client.infer("bands", [tensor], model_version="2").get_response()["model_version"] == "2"

        add_version(repo, "bands", 3, models["onnx"])  # picked up by the watcher, no restart
        wait_until(lambda: client.is_model_ready("bands", "3"), what="version 3 servable")
        add_version(repo, "bands", 4, None)
        index = {row["version"]: row for row in httpx.post(url + "/v2/repository/index").json()}
        assert [index[v]["state"] for v in "123"] == ["READY"] * 3
        assert index["4"]["state"] == "UNAVAILABLE" and "onnx" in index["4"]["reason"].lower()
        assert not client.is_model_ready("bands", "4") and answer("y", version="3") == "3"
        assert client.get_model_metadata("bands")["versions"] == ["1", "2", "3"]
        client.close()
        seen = metrics(url)
    requests = seen["imgcls_model_requests_total"]
    ok = {v: requests.get((("model", "bands"), ("status", "200"), ("version", v)), 0) for v in "123"}
    assert ok["1"] + ok["2"] == 60 + 10 + 1 + 1 and ok["3"] == 1
    assert requests[(("model", "bands"), ("status", "400"), ("version", "2"))] == 1
    assert seen["imgcls_model_latency_seconds_count"][(("model", "bands"), ("version", "2"))] == ok["2"]
    assert seen["imgcls_model_images_total"][(("model", "bands"), ("version", "1"))] == ok["1"]
    assert "refused model bands version 4" in (tmp_path / "log").read_text()


# ---- live quality monitoring ----------------------------------------------------------
def quality(url: str) -> dict[str, float]:
    return {name.removeprefix("imgcls_quality_"): values[(("model", "bands"), ("version", "1"))]
            for name, values in metrics(url).items() if name.startswith("imgcls_quality_")}


def test_quality_gauges_feedback_accuracy_alert_and_abnormal_inputs(models, tmp_path):
    import tritonclient.http as triton

    from shards.sources import open_source
    from tests.conftest import FASHION_MNIST

    meta = read_meta(models["onnx"])
    reference = meta["reference"]
    assert reference["split"] == "val" and reference["samples"] == 400 and reference["accuracy"] > 0.9
    assert abs(sum(reference["class_distribution"]) - 1) < 1e-6 and len(reference["confidence"]["shares"]) == 10
    val, labels = read_samples(meta, "val", 200)
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (CI installs it)")
    source = open_source(FASHION_MNIST)
    other = np.stack([source.load(60000 + i) for i in range(200)])  # another dataset: [N,28,28,1] uint8

    log = tmp_path / "log"
    with serving(models["onnx"], "--name", "bands", "--window", "200", "--alert-min-feedback", "100", log=log) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))

        def infer(name, datatype, data, request_id):
            tensor = triton.InferInput(name, list(data.shape), datatype)
            tensor.set_data_from_numpy(data)
            return client.infer("bands", [tensor], request_id=request_id)

        flagged_val = np.concatenate([infer("input", "FP32", val[i:i + 100], f"val-{i}").as_numpy("abnormal")
                                      for i in (0, 100)])
        live = quality(url)
        flagged_other = infer("pixels", "UINT8", other, "other").as_numpy("abnormal")

        def feedback(request_id, truth):
            return httpx.post(url + "/v2/models/bands/feedback",
                              json={"feedback": [{"id": request_id, "labels": [int(t) for t in truth]}]}).json()

        assert feedback("val-0", labels[:100]) == {"accepted": 1, "unknown_ids": []}
        assert feedback("nope", [0])["unknown_ids"] == ["nope"]
        calm = quality(url)
        feedback("val-100", (labels[100:] + 1) % 4)  # wrong labels: live accuracy falls to about half
        alarmed = quality(url)
        feedback("val-0", labels[:100])
        feedback("val-100", labels[100:])
        recovered = quality(url)
        client.close()

    print(f"abnormal: {flagged_val.mean():.1%} of val, {flagged_other.mean():.1%} of Fashion-MNIST")
    assert flagged_val.mean() < 0.15 and flagged_other.mean() > 0.8, "the abnormal flag does not separate them"
    assert live["window_predictions"] == 200 and live["class_distance"] < 0.15
    assert abs(live["mean_confidence"] - live["reference_mean_confidence"]) < 0.05
    assert live["reference_accuracy"] == reference["accuracy"] and np.isnan(live["live_accuracy"])
    assert calm["live_accuracy"] > reference["accuracy"] - 0.1 and calm["feedback_labels"] == 100
    assert calm["accuracy_alert"] == 0 and alarmed["accuracy_alert"] == 1 and recovered["accuracy_alert"] == 0
    assert alarmed["live_accuracy"] < 0.6 and recovered["live_accuracy"] > reference["accuracy"] - 0.03
    lines = log.read_text().splitlines()
    assert sum("ALERT started: model bands version 1" in line for line in lines) == 1, lines
    assert sum("ALERT ended: model bands version 1" in line for line in lines) == 1, lines


# ---- hostile clients: formats, decode load, stalled connections -----------------------
def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_formats_outside_the_allow_list_get_415_and_decodes_are_bounded(models, images):
    small = Image.open(images[0])
    big = encoded(Image.new("L", (3000, 3000)), "PNG")  # 9 Mpx: within the serving budget, slow to decode
    with serving(models["onnx"], "--decode-workers", "1", "--max-queue", "2") as url:
        for fmt in ("BMP", "GIF", "TIFF", "PPM"):
            answer = httpx.post(url + "/predict", files={"image": ("x.png", encoded(small, fmt), "image/png")})
            assert answer.status_code == 415 and fmt in answer.json()["error"], answer.text
        answer = httpx.post(url + "/predict", content=png_of_size(5000, 4000))  # under the builder's 64 Mpx
        assert answer.status_code == 400 and "16,000,000 allowed" in answer.json()["error"]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: httpx.post(url + "/predict", content=big, timeout=60), range(12)))
        busy = [a for a in answers if a.status_code == 503]
        assert busy and all(a.status_code == 200 for a in answers if a not in busy)
        assert busy[0].headers["retry-after"] == "1" and "--max-queue 2" in busy[0].json()["error"]
        assert httpx.post(url + "/predict", content=images[0].read_bytes()).status_code == 200


def test_stalled_clients_are_dropped_at_the_read_deadline(models, images):
    good = images[0].read_bytes()
    with serving(models["onnx"], "--read-timeout-s", "1.5", "--limit-concurrency", "3") as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        stalled[0].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        stalled[1].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(good)
                           + good[:10])  # the body never finishes
        time.sleep(0.3)
        assert httpx.get(url + "/health").status_code == 503  # --limit-concurrency: 2 stalled + this one
        start = time.perf_counter()
        replies = []
        for sock in stalled:
            sock.settimeout(10)
            replies.append(b"".join(iter(lambda s=sock: s.recv(65536), b"")))  # until the server closes
            sock.close()
        assert time.perf_counter() - start < 5
        assert replies[0] == b"" and replies[1].startswith(b"HTTP/1.1 408")
        assert httpx.get(url + "/health").status_code == 200


# ---- the page, in headless Chromium ---------------------------------------------------
@pytest.fixture
def chromium(tmp_path):
    """Debian's chromium driven through its chromedriver by selenium (no download: both paths given)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them as root)")
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for browsers or drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=800,700", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_classifies_a_chosen_image_in_chromium(models, images, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = predict_answers(models["onnx"], images[:1])[str(images[0])]
    with serving(models["onnx"]) as url:
        chromium.get(url + "/")
        chromium.find_element(By.ID, "file").send_keys(str(images[0]))
        WebDriverWait(chromium, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".row.result"))
        rows = chromium.find_elements(By.CSS_SELECTOR, ".row.result")
        shown = [(r.find_element(By.CLASS_NAME, "class").text, r.find_element(By.CLASS_NAME, "prob").text)
                 for r in rows]
        version = chromium.find_element(By.ID, "version").text
        screenshot = tmp_path / "page.png"
        chromium.save_screenshot(str(screenshot))
    assert [c for c, _ in shown] == [t["class"] for t in expected] + [c for c, _ in shown][len(expected):]
    assert len(shown) == 4 and shown[0][1] == f"{100 * expected[0]['prob']:.1f}%" and version == "1"
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    bar = (np.abs(pixels.astype(int) - (68, 170, 119)).sum(axis=2) < 30).sum()  # the bars' colour, #4a7
    assert pixels.shape[1] == 800 and bar > 2000 * expected[0]["prob"], f"{bar} pixels of the bars' colour"
