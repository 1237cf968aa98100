//! libpq's keyword/value connection strings (`host=db user='a b' password='it\'s'`), parsed
//! as libpq parses them (`conninfo_parse` in fe-connect.c): `keyword = value` pairs separated
//! by white space; a value is either bare (up to white space) or single-quoted; a backslash
//! takes the next character literally in both. Errors never quote values: one may be a
//! password.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("missing \"=\" after {0:?} in the connection string")]
    MissingEquals(String),
    #[error("unterminated quoted string in the connection string (value of {0:?})")]
    Unterminated(String),
    #[error("a keyword is missing in the connection string")]
    MissingKeyword,
}

/// The `(keyword, value)` pairs of `s`, in order.
pub fn parse(s: &str) -> Result<Vec<(String, String)>, ParseError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(ParseError::MissingEquals(key));
        }
        if key.is_empty() {
            return Err(ParseError::MissingKeyword);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ParseError::Unterminated(key)),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(ParseError::Unterminated(key)),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Writes pairs back as a connection string, every value quoted (so any value survives).
pub fn format(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{k}='{v}'")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<(String, String)> {
        parse(s).unwrap()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_as_libpq_does() {
        assert_eq!(p(""), vec![]);
        assert_eq!(
            p("  host=db   port = 5433 "),
            kv(&[("host", "db"), ("port", "5433")])
        );
        assert_eq!(
            p("password='a b c' user=x"),
            kv(&[("password", "a b c"), ("user", "x")])
        );
        assert_eq!(
            p(r"password='it\'s' x=a\ b"),
            kv(&[("password", "it's"), ("x", "a b")])
        );
        assert_eq!(
            p(r"password='back\\slash'"),
            kv(&[("password", r"back\slash")])
        );
        assert_eq!(
            p("password='' user=x"),
            kv(&[("password", ""), ("user", "x")])
        );
        assert_eq!(
            p("sslrootcert='/a path/ca.pem'"),
            kv(&[("sslrootcert", "/a path/ca.pem")])
        );
    }

    #[test]
    fn errors_never_show_a_value() {
        for (s, e) in [
            (
                "password='secret",
                ParseError::Unterminated("password".into()),
            ),
            ("host", ParseError::MissingEquals("host".into())),
            ("=secret", ParseError::MissingKeyword),
        ] {
            let got = parse(s).unwrap_err();
            assert_eq!(got, e);
            assert!(!got.to_string().contains("secret"), "{got}");
        }
    }

    #[test]
    fn format_round_trips() {
        let pairs = kv(&[("password", r"it's a \ test"), ("host", "db")]);
        assert_eq!(parse(&format(&pairs)).unwrap(), pairs);
    }
}
