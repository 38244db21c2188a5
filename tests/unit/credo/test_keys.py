"""Key generation, PKCS#8 encoding and loading, and the JWT algorithm per key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from credo import (
    InvalidKey,
    KeyType,
    generate_private_key,
    jwt_algorithm_for,
    load_private_key,
    private_key_to_pkcs8_der,
    private_key_to_pkcs8_pem,
)


@pytest.mark.parametrize(
    ("key_type", "alg"),
    [
        pytest.param(KeyType.EC_P256, "ES256", id="ec-p256"),
        pytest.param(KeyType.EC_P384, "ES384", id="ec-p384"),
        pytest.param(KeyType.RSA_2048, "RS256", id="rsa-2048"),
    ],
)
def test_generate_encode_load_round_trip(key_type: KeyType, alg: str) -> None:
    """Each key type generates, encodes as PKCS#8 PEM and DER, loads back, and has its alg."""
    key = generate_private_key(key_type)
    der = private_key_to_pkcs8_der(key)
    assert private_key_to_pkcs8_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    for data in (der, private_key_to_pkcs8_pem(key)):
        assert private_key_to_pkcs8_der(load_private_key(data)) == der
    assert jwt_algorithm_for(key) == alg
    assert jwt_algorithm_for(key.public_key()) == alg


def test_key_type_values_are_the_config_spellings() -> None:
    """KeyType values are the strings users write in config (SPIRE's)."""
    assert [k.value for k in KeyType] == ["ec-p256", "ec-p384", "rsa-2048"]
    assert KeyType("ec-p256") is KeyType.EC_P256
    assert generate_private_key("ec-p384").curve.name == "secp384r1"  # type: ignore[union-attr]


def test_default_key_type_is_p256() -> None:
    """The default key is EC P-256, as in SPIRE."""
    key = generate_private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"junk", id="junk-der"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", id="bad-pem"
        ),
        pytest.param(
            private_key_to_pkcs8_der(ed25519.Ed25519PrivateKey.generate()),  # type: ignore[arg-type]
            id="ed25519",
        ),
    ],
)
def test_load_private_key_refuses_bad_or_unsupported_keys(data: bytes) -> None:
    """Unreadable and non-EC/RSA keys raise InvalidKey."""
    with pytest.raises(InvalidKey):
        load_private_key(data)


def test_unknown_key_type_is_refused() -> None:
    """An unknown key type string raises InvalidKey listing the allowed ones."""
    with pytest.raises(InvalidKey, match="ec-p256"):
        generate_private_key("ed25519")
