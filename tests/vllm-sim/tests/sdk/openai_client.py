"""The OpenAI Python SDK as a real client of vllm-sim.

Run by tests/sdk.rs against an in-process simulator:

    python3 openai_client.py --base-url http://127.0.0.1:PORT \
        --failing-base-url http://127.0.0.1:PORT2 --model MODEL

Checks that completions and chat completions, streamed and not, come back
well-formed through the SDK's own types, that streamed and unstreamed text
agree, that usage (cached tokens included) is parsed, and that the
simulator's errors map to the SDK's exception classes. Exits non-zero, with
a traceback, on the first failed check; prints one line per check.
"""

import argparse
import sys

import openai
from openai import OpenAI


def check(name, condition, detail=""):
    if not condition:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok: {name}")


def client(base_url):
    # No retries: a failure must show, not be papered over.
    return OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=30.0)


def completions(sdk, model):
    plain = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=5, seed=7)
    check("completion object", plain.object == "text_completion", plain.object)
    check("completion id", plain.id.startswith("cmpl-"), plain.id)
    check("completion model", plain.model == model, plain.model)
    choice = plain.choices[0]
    check("completion finish_reason", choice.finish_reason == "length", choice.finish_reason)
    check("completion text", len(choice.text.split()) == 5, repr(choice.text))
    usage = plain.usage
    check("completion usage", usage.completion_tokens == 5, usage)
    check("completion total", usage.total_tokens == usage.prompt_tokens + 5, usage)

    chunks = list(
        sdk.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=5,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    token_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].text for c in token_chunks)
    check("streamed completion text", text == choice.text, f"{text!r} vs {choice.text!r}")
    check(
        "streamed completion finish",
        token_chunks[-1].choices[0].finish_reason == "length",
        token_chunks[-1],
    )
    check("streamed completion usage", chunks[-1].usage is not None, chunks[-1])
    check("streamed usage agrees", chunks[-1].usage.total_tokens == usage.total_tokens, chunks[-1].usage)

    # A shared prefix of whole blocks shows up as cached tokens.
    document = "The quick brown fox jumps over the lazy dog. " * 20
    sdk.completions.create(model=model, prompt=document + "Who jumps?", max_tokens=1)
    second = sdk.completions.create(model=model, prompt=document + "What colour?", max_tokens=1)
    details = second.usage.prompt_tokens_details
    cached = details.cached_tokens if details else None
    check("cached tokens", cached is not None and cached >= 160 and cached % 16 == 0, second.usage)

    raw = sdk.completions.with_raw_response.create(model=model, prompt="hi", max_tokens=1)
    check("x-served-by header", raw.headers.get("x-served-by") == "sim-sdk", dict(raw.headers))


def chat(sdk, model):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say something."}]},
    ]
    plain = sdk.chat.completions.create(model=model, messages=messages, max_completion_tokens=6, seed=3)
    check("chat object", plain.object == "chat.completion", plain.object)
    check("chat id", plain.id.startswith("chatcmpl-"), plain.id)
    message = plain.choices[0].message
    check("chat role", message.role == "assistant", message)
    check("chat content", len(message.content.split()) == 6, repr(message.content))
    check("chat finish_reason", plain.choices[0].finish_reason == "length", plain.choices[0])
    check("chat usage", plain.usage.completion_tokens == 6, plain.usage)

    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=6,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check("chat stream opens with the role", chunks[0].choices[0].delta.role == "assistant", chunks[0])
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check("streamed chat content", content == message.content, f"{content!r} vs {message.content!r}")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check("streamed chat finish", finishes == ["length"], finishes)
    check("streamed chat usage", chunks[-1].usage.total_tokens == plain.usage.total_tokens, chunks[-1].usage)

    # Without include_usage there is no usage chunk.
    bare = list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=2, stream=True))
    check("no usage unless asked", all(c.usage is None for c in bare), bare[-1])


def models(sdk, model):
    listed = sdk.models.list()
    check("models list", [m.id for m in listed.data] == [model], listed)


def errors(sdk, failing, model):
    try:
        sdk.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    except openai.NotFoundError as error:
        check("unknown model is NotFoundError", error.status_code == 404, error)
    else:
        raise AssertionError("unknown model accepted")
    try:
        sdk.completions.create(model=model, prompt="x", max_tokens=0)
    except openai.BadRequestError as error:
        check("max_tokens=0 is BadRequestError", error.status_code == 400, error)
    else:
        raise AssertionError("max_tokens=0 accepted")
    if failing:
        try:
            failing.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        except openai.InternalServerError as error:
            check("--fail-rate 1 is InternalServerError", error.status_code == 500, error)
            check("error message parsed", "fail-rate" in str(error), str(error))
        else:
            raise AssertionError("--fail-rate 1 answered")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--failing-base-url")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    sdk = client(args.base_url)
    failing = client(args.failing_base_url) if args.failing_base_url else None
    print(f"openai {openai.__version__}, python {sys.version.split()[0]}")
    models(sdk, args.model)
    completions(sdk, args.model)
    chat(sdk, args.model)
    errors(sdk, failing, args.model)
    print("all checks passed")


if __name__ == "__main__":
    main()
