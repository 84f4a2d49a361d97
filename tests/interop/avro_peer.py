"""A peer written without pis-worker's code: fastavro plus an independent CRC-64-AVRO, to check
that pis-worker's Avro single-object bytes are what the specification says.

  avro_peer.py decode <schema.avsc> <file>   -> JSON of the datum on stdout
  avro_peer.py encode-cancel <schema.avsc> <file>  -> writes a CancelPayment command
"""
import io
import json
import sys

import fastavro
from fastavro.schema import to_parsing_canonical_form

EMPTY = 0xC15D213AA4D7A795
TABLE = []
for i in range(256):
    fp = i
    for _ in range(8):
        fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
    TABLE.append(fp)


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


def load(path):
    with open(path) as f:
        raw = json.load(f)
    parsed = fastavro.parse_schema(raw)
    header = b"\xC3\x01" + crc64_avro(to_parsing_canonical_form(parsed).encode()).to_bytes(8, "little")
    return parsed, header


def main():
    mode, schema_path, file_path = sys.argv[1:4]
    schema, header = load(schema_path)
    if mode == "decode":
        data = open(file_path, "rb").read()
        if data[:10] != header:
            print(f"header mismatch: got {data[:10].hex()} expected {header.hex()}", file=sys.stderr)
            sys.exit(3)
        datum = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema)
        print(json.dumps(datum, default=str, sort_keys=True))
    elif mode == "encode-cancel":
        out = io.BytesIO()
        out.write(header)
        fastavro.schemaless_writer(out, schema, {
            "command_id": "py-cmd-1",
            "payment_id": "py-pay-1",
            "psu_id": "py-psu",
            "issued_at": 1700000000000,
            "body": ("be.pisworker.v1.CancelPayment", {"reason": "from python"}),
        })
        open(file_path, "wb").write(out.getvalue())
    else:
        sys.exit(2)


main()
