"""``arrcoc serve``: vLLM's OpenAI-compatible server with a pipeline, on a loopback port, asked with the
``openai`` client (a chat completion with a base64 PNG), then stopped."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm.entrypoints")  # not just "vllm": tests/vllm itself imports as a namespace package

from vllm_helpers import K, apply_reference, planned, toy_samples  # noqa: E402

START_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(server: subprocess.Popen, port: int, log) -> None:
    import urllib.request

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"arrcoc serve exited with {server.returncode}:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"arrcoc serve did not answer on port {port} within {START_SECONDS} s")


def test_serve_answers_a_chat_completion_with_an_image(toy, tmp_path):
    from openai import OpenAI
    from PIL import Image

    model, processor = toy
    sample = toy_samples(1)[0]
    port = free_port()
    command = [sys.executable, "-c", "from arrcoc.cli import main; main()", "serve", "arrcoc:toyvqa",
               "--pipeline", "random_keep", "--tokens", str(K),
               # everything below goes to vLLM
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "toyvqa", "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20),
               "--limit-mm-per-prompt", '{"image": 1}']
    with open(tmp_path / "serve.log", "w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            wait_until_up(server, port, log)
            buffer = io.BytesIO()
            Image.fromarray(sample.image).save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            reply = client.chat.completions.create(
                model="toyvqa", temperature=0, max_tokens=3,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": sample.question.text}]}])
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.seek(0)
        printed = log.read()
    assert "pipeline 'random_keep'" in printed and f"{K} visual tokens per image" in printed
    # The chat template renders the ToyVQA prompt: its text plus K placeholders, and apply's answer.
    import arrcoc.toyvqa as toyvqa

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question.text}]}],
        add_generation_prompt=True)
    assert text == toyvqa.prompt(sample.question.text)
    # vLLM's chat endpoint tokenises the rendered template without the tokenizer's BOS (templates carry
    # their own special tokens; this one has none): text tokens + K placeholders.
    ids = processor(images=[sample.image], text=[text], add_special_tokens=False)["input_ids"][0]
    assert reply.usage.prompt_tokens == len(ids) - 256 + K
    (want_ids, _), _ = apply_reference(model, processor, planned("random_keep", model), sample, bos=False)
    answer = processor.tokenizer.decode(want_ids, skip_special_tokens=True).strip()
    assert reply.choices[0].message.content.strip() == answer
