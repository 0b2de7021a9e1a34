"""The demo's last step: a real generation through every lab host's HTTPS front door.

Uses huggingface_hub's InferenceClient (TGI's recommended client) over TLS 1.3, verifying each
host's certificate against the fleet CA, with the lab's guest key: the same path a user's
application takes. Streams the answer of the first host, then asks every host once.

Usage: demo_generate.py --ca CA.crt --key KEY URL [URL...]
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time

import huggingface_hub

try:  # huggingface_hub >= 2 ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ca", required=True, help="the fleet CA certificate")
    parser.add_argument("--key", required=True, help="an API key of the front door (guest is enough)")
    parser.add_argument("--prompt", default="The fleet says:")
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args(argv)

    context = ssl.create_default_context(cafile=args.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    huggingface_hub.set_client_factory(lambda: httpx.Client(verify=context, trust_env=False))

    messages = [{"role": "user", "content": args.prompt}]
    for number, url in enumerate(args.urls):
        client = huggingface_hub.InferenceClient(base_url=url, api_key=args.key, timeout=60)
        started = time.monotonic()
        if number == 0:
            print(f"{url} (streaming): ", end="", flush=True)
            pieces = 0
            for chunk in client.chat_completion(messages, max_tokens=24, stream=True, seed=7):
                text = chunk.choices[0].delta.content or ""
                pieces += 1
                print(text, end="", flush=True)
            print(f"\n  {pieces} chunks in {time.monotonic() - started:.2f} s")
        else:
            answer = client.chat_completion(messages, max_tokens=24, seed=7)
            print(f"{url}: {answer.choices[0].message.content!r} "
                  f"({answer.usage.completion_tokens} tokens in {time.monotonic() - started:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
