"""A C benchmark sink: nginx answering like APNs, FCM (and its token endpoint) and Web Push.

Used by ``bench/bench_push.py``. Debian's ``nginx-light`` with its echo module
(``libnginx-mod-http-echo``), one process, HTTP/2 over TLS with a trustme certificate, pinned to
a core of its own. Answers (``shared/reference/http2-clients.md`` has the gotchas):

- ``POST /3/device/<token>``: HEADERS-only 200 echoing ``apns-id``, as APNs does;
- ``POST /v1/projects/<p>/messages:send``: 200 ``{"name": …}``, as FCM HTTP v1 does;
- ``POST /token``: an OAuth2 access token, as Google's token endpoint does;
- ``POST /push/<id>``: 201 with a ``Location``, as a Web Push service does.

Nothing checks what it receives: the fakes in ``relay/testing`` do that in the tests; here only
the cost of answering matters, and nginx's is ~10 µs a request. A second port (``slow_url``)
answers APNs requests after 1 s, for memory with 1,000 pushes in flight.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

NGINX = "/usr/sbin/nginx"
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"

_CONF = """
load_module {echo};
master_process off;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 100000000;
    http2_max_concurrent_streams 1000;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /3/device/ {{ echo_read_request_body; echo_exec @apns; }}
        location @apns {{ add_header apns-id $http_apns_id always; return 200; }}
        location /v1/projects/ {{
            default_type application/json;
            echo_read_request_body;
            echo -n '{{"name":"projects/bench/messages/0:1"}}';
        }}
        location /token {{
            default_type application/json;
            echo_read_request_body;
            echo -n '{{"access_token":"bench-token","expires_in":3600,"token_type":"Bearer"}}';
        }}
        location /push/ {{ echo_read_request_body; echo_exec @webpush; }}
        location @webpush {{ add_header location https://127.0.0.1/m/1 always; return 201; }}
    }}
    server {{
        listen 127.0.0.1:{slow_port} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /3/device/ {{ echo_read_request_body; echo_sleep 1; echo_exec @apns; }}
        location @apns {{ add_header apns-id $http_apns_id always; return 200; }}
    }}
}}
"""


def available() -> str | None:
    """Why the sink cannot run here, or None when it can."""
    if not os.path.exists(NGINX):
        return f"{NGINX} missing (Debian nginx-light)"
    if not os.path.exists(ECHO_MODULE):
        return f"{ECHO_MODULE} missing (Debian libnginx-mod-http-echo)"
    return None


class Sink:
    """nginx on ``127.0.0.1:port`` pinned to ``core``; ``ca_pem`` is the CA its certificate
    chains to."""

    def __init__(self, port: int, core: int) -> None:
        self.port = port
        self.core = core
        self.url = f"https://127.0.0.1:{port}"
        self.slow_url = f"https://127.0.0.1:{port + 1}"
        ca = trustme.CA()
        self.ca_pem = ca.cert_pem.bytes()
        self._cert = ca.issue_cert("127.0.0.1", "localhost")
        self._dir = Path(tempfile.mkdtemp(prefix="push-relay-sink-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sink:
        self._cert.cert_chain_pems[0].write_to_path(str(self._dir / "cert.pem"))
        self._cert.private_key_pem.write_to_path(str(self._dir / "key.pem"))
        conf = self._dir / "nginx.conf"
        conf.write_text(
            _CONF.format(echo=ECHO_MODULE, dir=self._dir, port=self.port, slow_port=self.port + 1)
        )
        self.process = subprocess.Popen(
            ["taskset", "-c", str(self.core), NGINX, "-c", str(conf), "-e", str(self._dir / "e")]
        )
        for _ in range(100):
            if (self._dir / "nginx.pid").exists():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {(self._dir / 'error.log').read_text()}")

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
