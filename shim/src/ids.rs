//! Validation of the ids that become host paths or names: container ids,
//! sandbox ids (CRI's `io.kubernetes.cri.sandbox-id` annotation, which the
//! shim also uses as a directory name). The rule is containerd's
//! own (`pkg/identifiers`): 1 to 76 characters, letters and digits joined
//! by single `.`, `_` or `-`. So no id is `.` or `..`, contains `/`, or
//! starts with `.`, and names the shim derives from ids (`.files`) can
//! never be mistaken for one.

/// containerd's `identifiers.maxLength`.
pub const MAX_ID_LEN: usize = 76;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {id:?} is not a valid identifier: {reason} (1 to 76 letters or digits, joined by single '.', '_' or '-')")]
pub struct InvalidId {
    pub what: &'static str,
    pub id: String,
    pub reason: &'static str,
}

/// Checks `id` (called `what` in the error) against containerd's rule.
pub fn validate(what: &'static str, id: &str) -> Result<(), InvalidId> {
    let refuse = |reason| {
        Err(InvalidId {
            what,
            id: id.chars().take(2 * MAX_ID_LEN).collect(),
            reason,
        })
    };
    if id.is_empty() {
        return refuse("it is empty");
    }
    if id.len() > MAX_ID_LEN {
        return refuse("it is longer than 76 characters");
    }
    let bytes = id.as_bytes();
    let separator = |b: u8| matches!(b, b'.' | b'_' | b'-');
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || separator(b))
    {
        return refuse("it contains a character other than a letter, digit, '.', '_' or '-'");
    }
    if separator(bytes[0]) || separator(bytes[bytes.len() - 1]) {
        return refuse("it starts or ends with a separator");
    }
    if bytes
        .windows(2)
        .any(|pair| separator(pair[0]) && separator(pair[1]))
    {
        return refuse("it has two separators in a row");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_and_ctr_ids_are_accepted() {
        let cri = "4f3c2b1a".repeat(8);
        assert_eq!(cri.len(), 64);
        for id in [cri.as_str(), "web", "web.mysql", "web.m0", "a_b-c.d", "x"] {
            validate("container id", id).unwrap();
        }
    }

    #[test]
    fn ids_that_name_other_paths_are_refused_with_the_reason() {
        for (id, reason) in [
            ("", "empty"),
            ("/", "character"),
            ("..", "separator"),
            (".", "separator"),
            (".files", "separator"),
            ("a/../../etc", "character"),
            ("a..b", "two separators"),
            ("web ", "character"),
            ("ü", "character"),
        ] {
            let error = validate("sandbox id", id).unwrap_err();
            assert!(
                error.to_string().contains(reason) && error.to_string().contains("sandbox id"),
                "{id:?}: {error}"
            );
        }
        let long = "a".repeat(77);
        assert!(validate("container id", &long)
            .unwrap_err()
            .to_string()
            .contains("longer than 76"));
    }
}
