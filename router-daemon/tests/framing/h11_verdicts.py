"""What h11 (the HTTP/1.1 parser uvicorn can run on, so what a vLLM server
may see) makes of request byte streams.

Reads a JSON list of hex-encoded byte streams on stdin and writes, for
each, a JSON object on one line: {"verdict": "accepted", "end": N, "body":
HEX}
for a complete first request (N: the bytes it took, head and body),
{"verdict": "incomplete"} when h11 needs more bytes, or
{"verdict": "rejected", "why": "..."}.
"""
import json
import sys

import h11


def verdict(data: bytes) -> dict:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return {"verdict": "incomplete"}
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.PAUSED:
                break
    except h11.RemoteProtocolError as err:
        return {"verdict": "rejected", "why": str(err)}
    leftover, _closed = conn.trailing_data
    return {
        "verdict": "accepted",
        "end": len(data) - len(leftover),
        "body": body.hex(),
    }


def main() -> None:
    streams = json.load(sys.stdin)
    for encoded in streams:
        print(json.dumps(verdict(bytes.fromhex(encoded))))


if __name__ == "__main__":
    main()
