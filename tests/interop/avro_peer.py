"""A peer written without pis-worker's code: fastavro plus an independent CRC-64-AVRO, to check
that pis-worker's Avro single-object bytes are what the specification says.

  avro_peer.py decode <schema.avsc> <file>   -> JSON of the datum on stdout
  avro_peer.py encode-cancel <schema.avsc> <file>  -> writes a CancelPayment command
  avro_peer.py encode-initiate <schema.avsc> <file> <payment_id> <psu_id>
      -> writes an InitiatePayment command with every field the schema has (a newer schema's
         extra fields included), single-object framed with that schema's fingerprint
  avro_peer.py encode-request-consent <schema.avsc> <file>  -> writes a RequestConsent command
  avro_peer.py encode-complete-consent <schema.avsc> <file> -> writes a CompleteConsent command
  avro_peer.py encode-consent-status <schema.avsc> <file>   -> writes a ConsentStatus event
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
    elif mode == "encode-initiate":
        payment_id, psu_id = sys.argv[4:6]
        initiate = {
            "payment_product": "SEPA_CREDIT_TRANSFERS",
            "brand": "BELFIUS",
            "amount": "21.50",
            "currency": "EUR",
            "creditor_name": "Python Peer",
            "creditor_iban": "BE68539007547034",
            "creditor_bic": None,
            "debtor_iban": None,
            "end_to_end_id": payment_id,
            "remittance_information": "written by fastavro",
            "requested_execution_date": None,
            "language": "nl",
            "redirect_uri": "https://client.example/callback",
        }
        envelope = {
            "command_id": "py-" + payment_id,
            "payment_id": payment_id,
            "psu_id": psu_id,
            "issued_at": 1700000000000,
        }
        # A newer schema's fields: set them, so that the record really carries them.
        with open(schema_path) as f:
            raw = json.load(f)
        names = [f["name"] for f in raw["fields"]]
        if "trace_id" in names:
            envelope["trace_id"] = "trace-" + payment_id
        body = next(f for f in raw["fields"] if f["name"] == "body")
        initiate_type = next(b for b in body["type"] if isinstance(b, dict) and b["name"] == "InitiatePayment")
        if any(f["name"] == "purpose_code" for f in initiate_type["fields"]):
            initiate["purpose_code"] = "SUPP"
        envelope["body"] = ("be.pisworker.v1.InitiatePayment", initiate)
        out = io.BytesIO()
        out.write(header)
        fastavro.schemaless_writer(out, schema, envelope)
        open(file_path, "wb").write(out.getvalue())
    elif mode == "encode-request-consent":
        write(file_path, header, schema, {
            "command_id": "py-cmd-consent",
            "payment_id": "py-consent-1",
            "psu_id": "py-psu",
            "issued_at": 1700000000000,
            "body": ("be.pisworker.v1.RequestConsent", {
                "brand": "BANX",
                "scope": "CAF",
                "account_iban": "BE71096123456769",
                "language": "fr",
                "redirect_uri": "https://client.example/consent",
            }),
        })
    elif mode == "encode-complete-consent":
        write(file_path, header, schema, {
            "command_id": "py-cmd-consent-2",
            "payment_id": "py-consent-1",
            "psu_id": "py-psu",
            "issued_at": 1700000000001,
            "body": ("be.pisworker.v1.CompleteConsent", {
                "authorization_code": None,
                "error": "access_denied",
                "error_description": "the PSU said no",
                "state": "py-state",
            }),
        })
    elif mode == "encode-consent-status":
        write(file_path, header, schema, {
            "event_id": "0b6f1b5e-0000-5000-8000-000000000001",
            "consent_id": "py-consent-1",
            "psu_id": "py-psu",
            "brand": "BELFIUS",
            "scope": "AIS",
            "account_iban": None,
            "sequence": 2,
            "state": "GRANTED",
            "is_final": False,
            "consent_uri": None,
            "valid_until": 1790000000000,
            "reason": None,
            "causation_id": "bank",
            "occurred_at": 1700000000002,
        })
    else:
        sys.exit(2)


def write(file_path, header, schema, datum):
    out = io.BytesIO()
    out.write(header)
    fastavro.schemaless_writer(out, schema, datum)
    open(file_path, "wb").write(out.getvalue())


main()
