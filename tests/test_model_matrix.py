"""Models beyond the demo decoder through the SDK's job loop, as deployed: the local endpoint,
the SDK in production mode, MAX_CONCURRENCY unset (the engine decides how many jobs the worker
takes). all-MiniLM-L6-v2 is encoder-only (no KV cache in vLLM); the sliding-window model keeps
two KV-cache groups (sliding-window and full-attention layers). Neither is modelled by the KV
projection: the engine's counts decide, and the worker says so. The demo decoder with a LoRA
adapter is projected as usual. The demo decoder's own matrix (long, short, n > 1, failed and
cancelled jobs, a shared prefix) is tests/test_admission_worker.py."""

from __future__ import annotations

import json

import pytest
from conftest import _RUN_DIR
from processes import Endpoint, embedding_endpoint

pytestmark = pytest.mark.slow


def assert_served_without_a_restart(ep: Endpoint, reason: str) -> None:
    log = ep.log.read_text()
    assert "The worker process exited" not in log, log[-3000:]
    # The start-up log names the rule in force and why.
    assert "the engine's counts decide" in log and reason in log, log[-3000:]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    ep = embedding_endpoint(tmp_path_factory.mktemp("pooling"))
    yield ep
    ep.close()


def test_embedding_score_and_batch_jobs_complete_without_a_restart(embedder):
    embed = [{"openai_route": "/v1/embeddings",
              "openai_input": {"model": "minilm", "input": f"sentence number {i}"}}
             for i in range(24)]
    score = [{"route": "/v1/score", "body": {"model": "minilm", "text_1": "a cat",
                                              "text_2": [f"a cat {i}", "stock prices"]}}
             for i in range(8)]
    batch = [{"batch": [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "minilm", "input": f"line {i}"}}
                        for i in range(16)]}]
    _, statuses, samples = embedder.run_all(embed + score + batch, timeout=300)
    assert len(statuses[0]["output"][0]["data"][0]["embedding"]) == 384
    assert_served_without_a_restart(embedder, "no KV cache")
    # More than one job at once: the intake did not fall to one job per take.
    assert max(p for p, _ in samples) >= 2, samples


@pytest.fixture(scope="module")
def sliding(tmp_path_factory, demo_model_dir):
    from sliding_model import build_sliding_model

    model = build_sliding_model(_RUN_DIR / "sliding-gemma2", demo_model_dir)
    ep = Endpoint(tmp_path_factory.mktemp("sliding"), MODEL_NAME=str(model),
                  SERVED_MODEL_NAME="sliding", ENFORCE_EAGER="true", MAX_MODEL_LEN="1024",
                  KV_CACHE_MEMORY_BYTES=str(16 * 1024 * 1024))
    yield ep
    ep.close()


def test_a_sliding_window_models_jobs_complete_and_are_not_preempted(sliding):
    """Native jobs (n = 1 and n = 2), an OpenAI chat job and a batch job at once, past the
    window (64 tokens), in a cache that holds them all: every job completes, the worker
    follows the engine's counts, and the engine preempts nothing (read before and after).
    (Without a projection of the requests' growth, a cache they outgrow together preempts
    some: 3 with a quarter of this cache, all recomputed by vLLM, every job completed.)"""
    before = sliding.preempted_so_far()
    jobs = [{"prompt": f"def job_{i}():", "sampling_params": {
        "max_tokens": 200, "ignore_eos": True, "temperature": 1.0, "n": 1 + i % 2}}
        for i in range(12)]
    jobs.append({"openai_route": "/v1/chat/completions", "openai_input": {
        "model": "sliding", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100, "ignore_eos": True}})
    jobs.append({"batch": [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "sliding", "prompt": f"line {i}",
                                     "max_tokens": 100, "ignore_eos": True}}
                           for i in range(8)]})
    _, statuses, _ = sliding.run_all(jobs, timeout=300)
    assert all(len(s["output"][0]["choices"]) == 1 + i % 2
               for i, s in enumerate(statuses[:12]))
    assert_served_without_a_restart(sliding, "several KV-cache groups")
    assert sliding.preempted_so_far() == before


@pytest.fixture(scope="module")
def with_lora(tmp_path_factory, demo_model_dir, lora_dir):
    """Two adapters; MAX_LORAS is vLLM's default, 1: one adapter per engine step."""
    from conftest import LORA_NAME
    from lora_adapter import build_lora_adapter

    other = build_lora_adapter(_RUN_DIR / "lora-other", demo_model_dir, seed=2)
    ep = Endpoint(tmp_path_factory.mktemp("lora"), LORA_MODULES=json.dumps(
        [{"name": LORA_NAME, "path": str(lora_dir)}, {"name": "other", "path": str(other)}]),
        MAX_MODEL_LEN="1024", KV_CACHE_MEMORY_BYTES=str(4 * 1024 * 1024))
    yield ep, LORA_NAME
    ep.close()


def test_lora_and_base_model_jobs_complete_side_by_side(with_lora):
    """The demo decoder with a LoRA adapter, MAX_CONCURRENCY unset: jobs on the adapter
    (native and OpenAI) beside jobs on the base model, all at once, in a cache that holds them:
    every job completes with its tokens, nothing is preempted (read before and after)."""
    ep, lora = with_lora
    before = ep.preempted_so_far()
    native = [{"prompt": f"def job_{i}():", **({"model": lora} if i % 2 else {}),
               "sampling_params": {"max_tokens": 64, "ignore_eos": True, "temperature": 1.0}}
              for i in range(8)]
    chat = [{"openai_route": "/v1/chat/completions", "openai_input": {
        "model": lora, "messages": [{"role": "user", "content": f"job {i}"}],
        "max_tokens": 32, "ignore_eos": True}} for i in range(4)]
    _, statuses, _ = ep.run_all(native + chat, timeout=300)
    assert all(s["output"][0]["usage"]["output"] == 64 for s in statuses[:8]), statuses
    assert all(s["output"][0]["model"] == lora for s in statuses[8:]), statuses
    assert ep.preempted_so_far() == before


def test_jobs_on_an_adapter_beyond_max_loras_do_not_hold_back_the_others(with_lora):
    """MAX_LORAS=1: while two long jobs run on one adapter, jobs on a second adapter wait in
    vLLM's scheduler for their turn. The intake must not stop for them (vLLM 0.32 counts them
    apart from the waiting requests): the short base-model jobs queued behind them are taken
    and end while the long ones still run; every job completes."""
    ep, lora = with_lora
    long = [{"prompt": f"def long_{i}():", "model": lora, "sampling_params": {
        "max_tokens": 400, "ignore_eos": True, "temperature": 1.0}} for i in range(2)]
    other = [{"prompt": f"def other_{i}():", "model": "other", "sampling_params": {
        "max_tokens": 16, "ignore_eos": True, "temperature": 1.0}} for i in range(2)]
    base = [{"prompt": f"def base_{i}():", "sampling_params": {
        "max_tokens": 16, "ignore_eos": True, "temperature": 1.0}} for i in range(12)]
    ids, statuses, _ = ep.run_all(long + other + base, timeout=300)
    assert all(s["output"][0]["usage"]["output"] == 400 for s in statuses[:2]), statuses[:2]
    records = [json.loads(line)["id"] for line in ep.records.read_text().splitlines()]
    ended = {job_id: records.index(job_id) for job_id in ids}  # the order jobs ended in
    first_long = min(ended[job_id] for job_id in ids[:2])
    # The case arose: the second adapter's jobs waited for the first adapter's to end.
    assert all(ended[job_id] > first_long for job_id in ids[2:4]), ended
    assert all(ended[job_id] < first_long for job_id in ids[4:]), (
        ended, ep.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory, demo_model_dir):
    from multimodal_model import build_multimodal_model

    model = build_multimodal_model(_RUN_DIR / "tiny-blip2", demo_model_dir)
    ep = Endpoint(tmp_path_factory.mktemp("multimodal"), MODEL_NAME=str(model),
                  SERVED_MODEL_NAME="blip", ENFORCE_EAGER="true", MAX_MODEL_LEN="512",
                  KV_CACHE_MEMORY_BYTES=str(4 * 1024 * 1024),
                  # An image fetch held by the test lasts until the test lets it go.
                  VLLM_IMAGE_FETCH_TIMEOUT="600")
    yield ep
    ep.close()


def _image_chat(url: str, i: int, max_tokens: int = 32) -> dict:
    return {"openai_route": "/v1/chat/completions", "openai_input": {
        "model": "blip", "max_tokens": max_tokens, "ignore_eos": True, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": f"image {i}"}]}]}}


def _text_job(i: int) -> dict:
    return {"prompt": f"def job_{i}():", "sampling_params": {
        "max_tokens": 32, "ignore_eos": True, "temperature": 1.0}}


def test_jobs_with_images_complete_beside_text_jobs(multimodal):
    """A multimodal model (each image a run of prompt tokens), MAX_CONCURRENCY unset: chat
    jobs with an image beside text jobs, all at once: every job completes, the KV projection
    decides (one KV-cache group), several jobs run at once, nothing is preempted."""
    from multimodal_model import IMAGE_TOKENS, data_url

    before = multimodal.preempted_so_far()
    images = [_image_chat(data_url((i * 40 % 256, 80, 160)), i) for i in range(8)]
    text = [_text_job(i) for i in range(8)]
    _, statuses, samples = multimodal.run_all(images + text, timeout=300)
    usage = statuses[0]["output"][0]["usage"]
    assert usage["prompt_tokens"] > IMAGE_TOKENS and usage["completion_tokens"] == 32, usage
    log = multimodal.log.read_text()
    assert "The worker process exited" not in log, log[-3000:]
    assert "room in its KV cache" in log, log[-3000:]
    assert max(p for p, _ in samples) >= 2, samples
    assert multimodal.preempted_so_far() == before


def test_a_job_whose_image_is_still_on_its_way_does_not_stop_the_intake(multimodal):
    """A job's request reaches the engine only once vLLM has its image: while a slow image
    server holds the fetch, text jobs queued after it are taken and complete (an intake that
    waited for every taken job to reach the engine would take none of them)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from multimodal_model import png_bytes

    asked, release = threading.Event(), threading.Event()
    png = png_bytes((10, 200, 10))

    class SlowImage(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            asked.set()
            release.wait(timeout=600)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        slow = multimodal.run(_image_chat(f"http://127.0.0.1:{server.server_port}/a.png", 0))
        assert asked.wait(timeout=120), "vLLM never asked for the image"
        text = [multimodal.run(_text_job(i)) for i in range(8)]
        statuses = [multimodal.wait(job_id, timeout=120) for job_id in text]
        assert [s["status"] for s in statuses] == ["COMPLETED"] * 8, statuses
    finally:
        release.set()
        final = multimodal.wait(slow, timeout=120)
        server.shutdown()
    assert final["status"] == "COMPLETED", final
