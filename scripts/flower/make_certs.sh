#!/usr/bin/env bash
# Make the certificates and keys a CollaFuse Flower deployment needs.
#
#   scripts/flower/make_certs.sh OUT_DIR [NUM_SUPERNODES] [SERVER_NAMES]
#
# OUT_DIR/ca.crt, ca.key            a private CA (give ca.crt to every SuperNode and to
#                                   whoever runs `flwr`; keep ca.key offline)
# OUT_DIR/server.crt, server.key    the SuperLink's TLS certificate, signed by the CA, with
#                                   subjectAltName "IP:127.0.0.1,DNS:localhost" (the operator's
#                                   CLI and the fleet gateway reach the SuperLink on loopback)
#                                   plus SERVER_NAMES, the names the hospitals reach the
#                                   gateway by, e.g. "DNS:collafuse.example.org,IP:10.0.0.5"
# OUT_DIR/server.pem                server.crt and server.key in one file, as the fleet gateway
#                                   (HAProxy, scripts/flower/fleet-gateway.cfg) reads them
# OUT_DIR/supernode-N (+ .pub)      one EC P-384 key pair per SuperNode, in OpenSSH format
#                                   (Flower's SuperNode authentication: the SuperLink
#                                   operator registers the .pub with
#                                   `flwr supernode register`, the SuperNode keeps the
#                                   private key and passes --auth-supernode-private-key)
#
# Needs openssl; the SuperNode keys use ssh-keygen when present and fall back to Python's
# `cryptography` (installed with flwr) otherwise.
set -euo pipefail

OUT=${1:?usage: make_certs.sh OUT_DIR [NUM_SUPERNODES] [SERVER_NAMES]}
N=${2:-2}
SAN="IP:127.0.0.1,DNS:localhost${3:+,$3}"
DAYS=${DAYS:-365}

mkdir -p "$OUT"
cd "$OUT"
umask 077

# 1. Certificate authority
openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$DAYS" \
    -keyout ca.key -out ca.crt -subj "/CN=CollaFuse Flower CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2. SuperLink server certificate (SAN is what clients check)
openssl req -newkey rsa:3072 -sha256 -nodes -keyout server.key -out server.csr \
    -subj "/CN=collafuse-superlink" 2>/dev/null
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days "$DAYS" -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
openssl verify -CAfile ca.crt server.crt >/dev/null
cat server.crt server.key > server.pem

# 3. SuperNode authentication key pairs (EC P-384, OpenSSH format)
for i in $(seq 1 "$N"); do
    k="supernode-$i"
    rm -f "$k" "$k.pub"
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$k" -f "$k"
    else
        python - "$k" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
name = sys.argv[1]
key = ec.generate_private_key(ec.SECP384R1())
open(name, "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption()))
open(name + ".pub", "wb").write(key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" " + name.encode() + b"\n")
PY
    fi
done
chmod 644 ca.crt server.crt ./*.pub
echo "wrote $(pwd): ca.crt ca.key server.crt server.key server.pem and $N SuperNode key pair(s)"
