"""The HTTP/2 client the httpx-based adapters (FCM, Web Push) share."""

from __future__ import annotations

import ssl
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx


def provider_client(*, ca_pem: bytes, proxy: str, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """An HTTP/2 client for one app's provider, configured by the app's settings alone.

    Args:
        ca_pem: extra trust anchors (PEM), added to the system's; loaded from memory.
        proxy: ``http://host:port`` of a proxy, or "" for none.
        timeout: the backstop timeouts (the relay's deadline is usually far shorter).
    """
    context = ssl.create_default_context()
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return httpx.AsyncClient(
        http2=True,
        verify=context,
        proxy=proxy or None,
        timeout=timeout,
        follow_redirects=False,  # UnifiedPush: "Redirects MUST NOT be followed" (SSRF)
        trust_env=False,  # no proxy or CA bundle from the environment behind the config's back
        # Keep no cookies: a provider's Set-Cookie would make the stateless relay carry state.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
