"""Ten simultaneous requests through the router, as the Go original's example.

They share one tunnel: HTTP/2 multiplexes them over the backend's single TCP
connection.

    python examples/user.py [http://127.0.0.1:8888/foo]
"""

import logging
import sys
import threading
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8888/foo"


def get(url: str) -> None:
    logging.info("> GET %s", url)
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read().decode()
        logging.info("< %d %s %s", response.status, response.reason, '"' + body + '"')


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = [threading.Thread(target=get, args=(URL,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
