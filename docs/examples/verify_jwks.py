"""Verifies a basalt access token from the JWKS alone, with PyJWT.

    pip install "pyjwt[crypto]"
    BASALT_URL=http://127.0.0.1:7070 python3 verify_jwks.py ACCESS_TOKEN

BASALT_ISSUER must be the server's `public_url` when that is set; it defaults to `basalt`.
"""
import json
import os
import sys

import jwt
from jwt import PyJWKClient

BASALT_URL = os.environ.get("BASALT_URL", "http://127.0.0.1:7070")
ISSUER = os.environ.get("BASALT_ISSUER", "basalt")

# Caches the key set; looks the key up by the token's `kid`.
jwks = PyJWKClient(f"{BASALT_URL}/.well-known/jwks.json", cache_keys=True)


def verify_basalt_token(token: str) -> dict:
    signing_key = jwks.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        signing_key.key,
        algorithms=["EdDSA"],
        audience="basalt",  # user tokens; admin tokens carry "basalt-admin"
        issuer=ISSUER,
        options={"require": ["exp", "iat", "sub", "aud", "iss"]},
    )


if __name__ == "__main__":
    print("verified:", json.dumps(verify_basalt_token(sys.argv[1])))
