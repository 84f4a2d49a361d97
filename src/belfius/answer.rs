//! Reading the bank's answer to an initiation, in every shape a Belfius bank plausibly sends.
//!
//! The v3 answer is not publicly documented (docs/belfius.md, "Initiation answer"). The
//! evidence allows four shapes, and the simulator has a dialect for each
//! (`sandbox::dialect`):
//! - [`AnswerShape::LinksBody`]: 2xx, the id in the body, the SCA link in `_links.scaRedirect`
//!   (the Berlin Group style the portal's field names suggest) [I];
//! - [`AnswerShape::LocationHeader`]: 2xx, the SCA link only in `Location` [C: v1, Tink];
//! - [`AnswerShape::Redirect`]: a 3xx to the SCA page, `Location` only [C: Tink turned redirect
//!   following off to read it];
//! - [`AnswerShape::ScaRequired`]: 401 `SCA_REQUIRED` (`B14800ZZ-0PLC-REDRCT`), "follow the
//!   corresponding URL in the response body": the URL in `error_description` [P error table; C:
//!   Belfius's own description of the AIS case].
//!
//! The bank's payment id is taken from the body (`payment_id`, `paymentId`) or, when the body
//! has none, from the SCA link's query (`payment_id`, `paymentId`) [I]. An answer with no SCA
//! link, or with no payment id anywhere, matches no shape: [`BankError::Unrecognized`], which
//! ends the payment `REJECTED` with `BANK_ANSWER_UNRECOGNIZED`, naming what was missing. It is
//! never re-initiated: the bank may hold a payment, but the PSU never saw its link, so it cannot
//! be signed and expires at the bank.

use serde::Deserialize;

use super::{BankError, Initiated};
use crate::domain::model::BankPaymentId;

/// Which of the known shapes an initiation answer had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerShape {
    LinksBody,
    LocationHeader,
    Redirect,
    ScaRequired,
}

impl AnswerShape {
    pub const ALL: [AnswerShape; 4] = [
        AnswerShape::LinksBody,
        AnswerShape::LocationHeader,
        AnswerShape::Redirect,
        AnswerShape::ScaRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AnswerShape::LinksBody => "links-body",
            AnswerShape::LocationHeader => "location-header",
            AnswerShape::Redirect => "redirect",
            AnswerShape::ScaRequired => "sca-required",
        }
    }
}

/// The parts of an HTTP answer the reader looks at.
#[derive(Debug, Clone, Copy)]
pub struct RawAnswer<'a> {
    pub status: u16,
    pub location: Option<&'a str>,
    pub body: &'a [u8],
}

impl RawAnswer<'_> {
    /// Whether the client should hand this answer to [`read`] rather than treat it as a
    /// failure: any 2xx or 3xx, and a 401 whose body says `SCA_REQUIRED`.
    pub fn is_initiation_answer(&self) -> bool {
        match self.status {
            200..=399 => true,
            401 => is_sca_required(self.body),
            _ => false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default, alias = "paymentId")]
    payment_id: Option<String>,
    #[serde(default, alias = "transactionStatus")]
    transaction_status: Option<String>,
    #[serde(default, rename = "_links")]
    links: Option<Links>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Links {
    #[serde(default, rename = "scaRedirect", alias = "sca_redirect")]
    sca_redirect: Option<Href>,
}

#[derive(Debug, Deserialize)]
struct Href {
    href: String,
}

const SCA_REQUIRED: &str = "SCA_REQUIRED";
const SCA_REQUIRED_CODE: &str = "B14800ZZ-0PLC-REDRCT";

fn is_sca_required(body: &[u8]) -> bool {
    serde_json::from_slice::<Body>(body).is_ok_and(|b| {
        b.error
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(SCA_REQUIRED))
            || b.error_code.as_deref() == Some(SCA_REQUIRED_CODE)
    })
}

/// Reads an initiation answer (see the module docs). `request` is the initiation's URL: a
/// relative link is resolved against it (RFC 9110 §10.2.2).
pub fn read(
    answer: &RawAnswer<'_>,
    request: &url::Url,
) -> Result<(Initiated, AnswerShape), BankError> {
    let status = answer.status;
    let body: Body = if answer.body.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        serde_json::from_slice(answer.body).map_err(|e| {
            BankError::Unrecognized(format!(
                "the HTTP {status} answer to the initiation is not the expected JSON: {e}"
            ))
        })?
    };
    let location = answer.location.map(str::trim).filter(|l| !l.is_empty());
    let body_link = body
        .links
        .as_ref()
        .and_then(|l| l.sca_redirect.as_ref())
        .map(|h| h.href.trim())
        .filter(|h| !h.is_empty());
    let (shape, link) = match status {
        200..=299 => match (body_link, location) {
            (Some(link), _) => (AnswerShape::LinksBody, link.to_owned()),
            (None, Some(link)) => (AnswerShape::LocationHeader, link.to_owned()),
            (None, None) => {
                return Err(BankError::Unrecognized(format!(
                    "HTTP {status} to the initiation without an SCA link (no _links.scaRedirect, no Location)"
                )));
            }
        },
        300..=399 => match location {
            Some(link) => (AnswerShape::Redirect, link.to_owned()),
            None => {
                return Err(BankError::Unrecognized(format!(
                    "HTTP {status} to the initiation without a Location"
                )));
            }
        },
        401 if is_sca_required(answer.body) => {
            let link = body_link
                .map(str::to_owned)
                .or_else(|| body.error_description.as_deref().and_then(first_url))
                .or_else(|| location.map(str::to_owned));
            match link {
                Some(link) => (AnswerShape::ScaRequired, link),
                None => {
                    return Err(BankError::Unrecognized(
                        "401 SCA_REQUIRED to the initiation without a URL in error_description"
                            .into(),
                    ));
                }
            }
        }
        other => {
            return Err(BankError::Unrecognized(format!(
                "HTTP {other} is no initiation answer"
            )));
        }
    };
    let sca = request.join(&link).map_err(|e| {
        BankError::Unrecognized(format!(
            "the SCA link of the initiation answer is not a URL: {e}"
        ))
    })?;
    let payment_id = body
        .payment_id
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .or_else(|| id_in_query(&sca))
        .ok_or_else(|| {
            BankError::Unrecognized(format!(
                "the {} answer to the initiation carries no payment id (not in the body, not in the SCA link's query)",
                shape.as_str()
            ))
        })?;
    Ok((
        Initiated {
            bank_payment_id: BankPaymentId::new(payment_id),
            sca_redirect_url: sca.to_string(),
            bank_status: body
                .transaction_status
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        },
        shape,
    ))
}

/// The first `https://` or `http://` URL in a text, up to whitespace (and without a trailing
/// sentence mark).
fn first_url(text: &str) -> Option<String> {
    let start = text.find("https://").or_else(|| text.find("http://"))?;
    let url: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '<' && *c != '>')
        .collect();
    let url = url.trim_end_matches(['.', ',', ';', ')']);
    url::Url::parse(url).ok().map(|u| u.to_string())
}

fn id_in_query(url: &url::Url) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == "payment_id" || k == "paymentId")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> url::Url {
        url::Url::parse("https://bank.example/payments/sepa-credit-transfers")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn read_ok(status: u16, location: Option<&str>, body: &str) -> (Initiated, AnswerShape) {
        let answer = RawAnswer {
            status,
            location,
            body: body.as_bytes(),
        };
        assert!(answer.is_initiation_answer(), "{status} {body}");
        read(&answer, &request()).unwrap_or_else(|e| panic!("{status} {body}: {e}"))
    }

    fn read_err(status: u16, location: Option<&str>, body: &str) -> String {
        let answer = RawAnswer {
            status,
            location,
            body: body.as_bytes(),
        };
        match read(&answer, &request()) {
            Ok(ok) => panic!("{status} {body}: read as {ok:?}"),
            Err(BankError::Unrecognized(why)) => why,
            Err(other) => panic!("{status} {body}: {other}"),
        }
    }

    #[test]
    fn each_shape_reads_to_the_same_payment() {
        let link = "https://sca.example/sca/p-1";
        let cases = [
            (
                201,
                Some(link),
                r#"{"payment_id":"p-1","transaction_status":"RCVD","_links":{"scaRedirect":{"href":"https://sca.example/sca/p-1"}}}"#.to_owned(),
                AnswerShape::LinksBody,
            ),
            (201, Some(link), r#"{"paymentId":"p-1","transactionStatus":"RCVD"}"#.to_owned(), AnswerShape::LocationHeader),
            (302, Some("https://sca.example/sca/p-1?payment_id=p-1"), String::new(), AnswerShape::Redirect),
            (
                401,
                None,
                r#"{"error":"SCA_REQUIRED","error_code":"B14800ZZ-0PLC-REDRCT","error_description":"SCA is required. Please follow the corresponding URL: https://sca.example/sca/p-1?payment_id=p-1."}"#.to_owned(),
                AnswerShape::ScaRequired,
            ),
        ];
        for (status, location, body, shape) in cases {
            let (initiated, got) = read_ok(status, location, &body);
            assert_eq!(got, shape, "{body}");
            assert_eq!(initiated.bank_payment_id.as_str(), "p-1");
            assert!(
                initiated.sca_redirect_url.starts_with(link),
                "{}",
                initiated.sca_redirect_url
            );
        }
    }

    #[test]
    fn a_relative_location_is_resolved_against_the_request() {
        let (initiated, shape) = read_ok(201, Some("/sca/p-9"), r#"{"payment_id":"p-9"}"#);
        assert_eq!(shape, AnswerShape::LocationHeader);
        assert_eq!(initiated.sca_redirect_url, "https://bank.example/sca/p-9");
        assert_eq!(initiated.bank_status, None);
    }

    #[test]
    fn answers_that_match_no_shape_name_what_is_missing() {
        assert!(read_err(201, None, r#"{"payment_id":"p"}"#).contains("without an SCA link"));
        assert!(read_err(201, Some("https://sca.example/x"), "{}").contains("no payment id"));
        assert!(read_err(302, None, "").contains("without a Location"));
        assert!(read_err(302, Some("https://sca.example/x"), "").contains("redirect answer"));
        assert!(read_err(200, Some("https://s/x"), "not json").contains("not the expected JSON"));
        assert!(
            read_err(
                401,
                None,
                r#"{"error":"SCA_REQUIRED","error_description":"SCA is required."}"#
            )
            .contains("without a URL")
        );
    }

    #[test]
    fn only_sca_required_makes_a_401_an_answer() {
        let refused = RawAnswer {
            status: 401,
            location: None,
            body: br#"{"error":"FAILED_SECURITY_VALIDATION","error_code":"GEN-1203-100004"}"#,
        };
        assert!(!refused.is_initiation_answer());
        for status in [400, 403, 404, 406, 429, 500, 503] {
            let answer = RawAnswer {
                status,
                location: Some("https://x/"),
                body: b"{}",
            };
            assert!(!answer.is_initiation_answer(), "{status}");
        }
        let by_code = RawAnswer {
            status: 401,
            location: None,
            body: br#"{"error":"x","error_code":"B14800ZZ-0PLC-REDRCT"}"#,
        };
        assert!(by_code.is_initiation_answer());
    }

    #[test]
    fn first_url_stops_at_the_end_of_the_url() {
        assert_eq!(
            first_url("go to https://a.example/p?x=1. Then").as_deref(),
            Some("https://a.example/p?x=1")
        );
        assert_eq!(first_url("no link here"), None);
    }
}
