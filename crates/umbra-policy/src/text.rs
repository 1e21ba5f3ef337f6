//! Policy text: parsing, strict validation against the schema, readable error reasons, and
//! generation of simple allow policies.
//!
//! # Policy ids
//!
//! A stored policy (`PolicyText`) may hold several Cedar policies. Inside Cedar, the first gets
//! the stored id itself and the following ones `<id>#1`, `<id>#2`, ... in text order, so an
//! audit record's policy id always leads back to the stored policy that decided.

use cedar_policy::ffi::DetailedError;
use cedar_policy::{PolicyId, PolicySet, ValidationMode, ValidationWarning, Validator};

use crate::PolicyError;
use crate::schema;

/// Who an [`allow_policy`] grants access to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySubject {
    /// One user, by id (e-mail address).
    User(String),
    /// Every member of a group, by name.
    Group(String),
    /// Every user.
    Everyone,
}

/// Parses `text` and validates it strictly against [`SCHEMA`](crate::SCHEMA).
///
/// Returns the number of policies in the text. Refuses empty text, templates, syntax errors,
/// schema mismatches, policies that can never apply and bidirectional control characters, each
/// with a reason a person can act on (with line and column). Meant for the moment an
/// administrator stores a policy; snapshots are loaded with a slightly more lenient check.
pub fn validate_policy(text: &str) -> Result<usize, PolicyError> {
    let set = parse(text, None)?;
    let validator = Validator::new(schema::schema()?);
    validate(&validator, &set, text, Check::Write)?;
    check_ids(&set)?;
    Ok(set.num_of_policies())
}

/// Refuses entity literals no stored object can ever have: Cedar compares ids exactly, so a
/// `forbid` naming `Umbra::User::"Mallory@Corp.example"` would never apply to the user the
/// controller stores as `mallory@corp.example`, and would be accepted in silence. Users are
/// lowercased ASCII e-mail addresses, groups and services [`umbra_proto::valid_name`]s.
/// Write time only: a snapshot's already stored policies load as they are.
fn check_ids(set: &PolicySet) -> Result<(), PolicyError> {
    let mut reasons = Vec::new();
    for policy in set.policies() {
        for uid in policy.entity_literals() {
            let ty = uid.type_name().to_string();
            let id = uid.id().unescaped();
            let why = match ty.as_str() {
                schema::USER => match umbra_proto::user_id(id) {
                    Some(stored) if stored == id => continue,
                    Some(stored) => format!(
                        "user ids are stored lowercased; write {}::{}",
                        schema::USER,
                        literal(&stored)
                    ),
                    None => "a user id is an ASCII e-mail address".to_owned(),
                },
                // Generated, never chosen: `d-` and 16 lowercase hex digits.
                schema::DEVICE if device_id_shaped(id) => continue,
                schema::DEVICE => {
                    let lower = id.to_ascii_lowercase();
                    if device_id_shaped(&lower) {
                        format!(
                            "device ids are lowercase; write {}::{}",
                            schema::DEVICE,
                            literal(&lower)
                        )
                    } else {
                        "a device id is d- and 16 lowercase hex digits (see `umbra admin device list`)"
                            .to_owned()
                    }
                }
                schema::GROUP | schema::SERVICE if umbra_proto::valid_name(id) => continue,
                schema::GROUP | schema::SERVICE => {
                    "names are 1-63 lowercase letters, digits, '-', '_' or '.'".to_owned()
                }
                _ => continue,
            };
            let shown = umbra_proto::escape_controls(id);
            reasons.push(format!(
                "{ty}::\"{shown}\" can never match anything stored: {why}"
            ));
        }
    }
    reasons.dedup();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(PolicyError::Invalid(reasons.join("; ")))
    }
}

/// A user, group or service a policy text names by id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Named {
    User(String),
    Group(String),
    Service(String),
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Named::User(id) => write!(f, "user {id}"),
            Named::Group(id) => write!(f, "group {id}"),
            Named::Service(id) => write!(f, "service {id}"),
        }
    }
}

/// The users, groups and services `text` names (in its scopes and conditions), each once,
/// sorted. The controller checks them against what is stored when the policy is written: a
/// name that does not exist (a typo, or a group since removed) grants nothing, and Cedar
/// accepts it in silence. Devices are left out: their ids are generated, never typed.
pub fn named_entities(text: &str) -> Result<Vec<Named>, PolicyError> {
    let set = parse(text, None)?;
    let mut named: Vec<Named> = set
        .policies()
        .flat_map(|p| p.entity_literals())
        .filter_map(|uid| {
            let id = uid.id().unescaped().to_owned();
            match uid.type_name().to_string().as_str() {
                schema::USER => Some(Named::User(id)),
                schema::GROUP => Some(Named::Group(id)),
                schema::SERVICE => Some(Named::Service(id)),
                _ => None,
            }
        })
        .collect();
    named.sort();
    named.dedup();
    Ok(named)
}

/// `d-` and 16 lowercase hex digits: the shape of every device id the controller generates.
fn device_id_shaped(id: &str) -> bool {
    id.strip_prefix("d-").is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Parses one stored policy text and validates it (schema errors only, see [`Check::Load`]),
/// giving its policies the ids described in the module docs.
pub(crate) fn parse_stored(
    validator: &Validator,
    id: &str,
    text: &str,
) -> Result<PolicySet, PolicyError> {
    let stored = |e| PolicyError::Stored {
        id: id.to_owned(),
        error: Box::new(e),
    };
    let set = parse(text, Some(id)).map_err(stored)?;
    validate(validator, &set, text, Check::Load).map_err(stored)?;
    Ok(set)
}

/// Parses `text` as static policies. With `id`, renames Cedar's generated ids (`policy0`,
/// `policy1`, ... in text order) to `id`, `id#1`, ...
fn parse(text: &str, id: Option<&str>) -> Result<PolicySet, PolicyError> {
    let parsed: PolicySet = text.parse().map_err(|e: cedar_policy::ParseErrors| {
        PolicyError::Syntax(describe(&DetailedError::from(&e), text))
    })?;
    if let Some(t) = parsed.templates().next() {
        return Err(PolicyError::Template(format!(
            "policy {} has slots; write a static policy",
            position_of(t.id()).map_or_else(|| t.id().to_string(), |n| (n + 1).to_string())
        )));
    }
    if parsed.num_of_policies() == 0 {
        return Err(PolicyError::Empty);
    }
    let Some(id) = id else {
        return Ok(parsed);
    };
    let mut renamed = PolicySet::new();
    for policy in parsed.policies() {
        let n = position_of(policy.id()).ok_or_else(|| {
            PolicyError::Syntax(format!("unexpected generated policy id {}", policy.id()))
        })?;
        let new_id = if n == 0 {
            id.to_owned()
        } else {
            format!("{id}#{n}")
        };
        renamed
            .add(policy.new_id(PolicyId::new(&new_id)))
            .map_err(|_| PolicyError::DuplicatePolicyId(new_id))?;
    }
    Ok(renamed)
}

/// The text position of a policy Cedar named `policy<n>` while parsing.
fn position_of(id: &PolicyId) -> Option<usize> {
    AsRef::<str>::as_ref(id)
        .strip_prefix("policy")?
        .parse()
        .ok()
}

/// How picky validation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// An administrator is storing the text: also refuse the warnings that flag a mistake or a
    /// trick ([`refused_at_write`]).
    Write,
    /// A snapshot is being loaded: only schema errors refuse. Warnings never change what a
    /// policy does at run time, and a Cedar upgrade that adds a warning must not make brokers
    /// reject every snapshot that holds an already stored policy.
    Load,
}

fn validate(
    validator: &Validator,
    set: &PolicySet,
    text: &str,
    check: Check,
) -> Result<(), PolicyError> {
    let result = validator.validate(set, ValidationMode::Strict);
    let errors = result
        .validation_errors()
        .map(|e| describe(&DetailedError::from(e), text));
    let warnings = result
        .validation_warnings()
        .filter(|w| check == Check::Write && refused_at_write(w))
        .map(|w| describe(&DetailedError::from(w), text));
    let reasons: Vec<String> = errors.chain(warnings).collect();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(PolicyError::Invalid(reasons.join("; ")))
    }
}

/// Validator warnings an administrator may not store: a policy that can never apply (a device
/// as principal, a group as resource: surely not what was meant), and bidirectional control
/// characters (text that reads differently from what it does). Mixed-script and non-ASCII ids
/// stay allowed: internationalised e-mail addresses are real user ids.
fn refused_at_write(w: &ValidationWarning) -> bool {
    matches!(
        w,
        ValidationWarning::ImpossiblePolicy(_)
            | ValidationWarning::InvalidActionApplication(_)
            | ValidationWarning::BidiCharsInString(_)
            | ValidationWarning::BidiCharsInIdentifier(_)
    )
}

/// One line per diagnostic: message, where it points, and Cedar's hint.
fn describe(d: &DetailedError, text: &str) -> String {
    let mut out = d.message.clone();
    if let Some(label) = d.source_locations.first() {
        let (line, col) = line_col(text, label.loc.start);
        out.push_str(&format!(" (at line {line}, column {col}"));
        if let Some(l) = label.label.as_deref().filter(|l| !l.is_empty()) {
            out.push_str(&format!(": {l}"));
        }
        out.push(')');
    }
    if let Some(help) = d.help.as_deref().filter(|h| !h.is_empty()) {
        out.push_str(&format!("; help: {help}"));
    }
    for related in &d.related {
        out.push_str("; ");
        out.push_str(&describe(related, text));
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, col)
}

/// A Cedar policy that lets `subject` connect to `service`.
///
/// Ids are written as Cedar string literals with every special character escaped (Cedar's own
/// printer uses the same escaping), so no id can end the literal and inject policy text.
pub fn allow_policy(subject: &PolicySubject, service: &str) -> String {
    let principal = match subject {
        PolicySubject::User(u) => format!("principal == {}::{}", schema::USER, literal(u)),
        PolicySubject::Group(g) => format!("principal in {}::{}", schema::GROUP, literal(g)),
        PolicySubject::Everyone => "principal".to_owned(),
    };
    format!(
        "permit (\n  {principal},\n  action == {}::{},\n  resource == {}::{}\n);\n",
        schema::ACTION,
        literal(schema::CONNECT),
        schema::SERVICE,
        literal(service),
    )
}

/// `s` as a Cedar string literal.
fn literal(s: &str) -> String {
    // Cedar unescapes string literals with Rust's rules (`rustc_literal_escaper`) and prints
    // them with `escape_debug`; the two are inverse.
    format!("\"{}\"", s.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::{Policy, PrincipalConstraint, ResourceConstraint};

    const EXAMPLE_USER: &str = r#"permit (
  principal == Umbra::User::"alice@example.com",
  action == Umbra::Action::"connect",
  resource == Umbra::Service::"web"
);"#;

    fn invalid(text: &str) -> String {
        match validate_policy(text) {
            Err(e @ PolicyError::Invalid(_)) => e.to_string(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn named_entities_are_found_in_scopes_and_conditions_once() {
        let text = r#"permit (principal in Umbra::Group::"eng", action == Umbra::Action::"connect", resource == Umbra::Service::"wiki")
when { principal == Umbra::User::"bob@example.test" || resource == Umbra::Service::"wiki" };
forbid (principal == Umbra::User::"bob@example.test", action, resource)
when { resource in [Umbra::Service::"db", Umbra::Service::"wiki"] }
unless { context.device == Umbra::Device::"d-0123456789abcdef" };"#;
        assert_eq!(
            named_entities(text),
            Ok(vec![
                Named::User("bob@example.test".into()),
                Named::Group("eng".into()),
                Named::Service("db".into()),
                Named::Service("wiki".into()),
            ])
        );
        assert_eq!(
            Named::Group("eng".into()).to_string(),
            "group eng",
            "as a person reads it"
        );
        // Every user, every service: nothing named.
        let open = r#"permit (principal, action == Umbra::Action::"connect", resource);"#;
        assert_eq!(named_entities(open), Ok(Vec::new()));
        assert!(named_entities("permit (").is_err());
    }

    #[test]
    fn valid_permit_on_user() {
        assert_eq!(validate_policy(EXAMPLE_USER), Ok(1));
    }

    #[test]
    fn valid_permit_on_group() {
        let text = r#"permit (principal in Umbra::Group::"eng", action == Umbra::Action::"connect", resource);"#;
        assert_eq!(validate_policy(text), Ok(1));
    }

    #[test]
    fn valid_forbid_and_several_policies() {
        let text = r#"
            // contractors never reach the database
            forbid (principal in Umbra::Group::"contractors", action, resource == Umbra::Service::"db");
            permit (principal, action, resource) when { context.transport == "quic" && context.now > 0 };
            permit (principal, action, resource) when { context.device.owner == principal };
        "#;
        assert_eq!(validate_policy(text), Ok(3));
    }

    #[test]
    fn empty_text_is_refused() {
        assert_eq!(validate_policy(""), Err(PolicyError::Empty));
        assert_eq!(
            validate_policy("  // nothing here\n"),
            Err(PolicyError::Empty)
        );
    }

    #[test]
    fn syntax_error_names_the_location() {
        let text = "permit (\n  principal,\n  action\n  resource\n);";
        let err = validate_policy(text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PolicyError::Syntax(_)), "{msg}");
        assert!(msg.contains("line 4, column 3"), "{msg}");
        assert!(err.is_admin_input());
    }

    #[test]
    fn unknown_attribute_is_refused() {
        let msg =
            invalid(r#"permit (principal, action, resource) when { context.posture == "good" };"#);
        assert!(msg.contains("posture"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn unknown_entity_type_is_refused() {
        let msg = invalid(r#"permit (principal == Umbra::Admin::"root", action, resource);"#);
        assert!(msg.contains("Umbra::Admin"), "{msg}");
    }

    #[test]
    fn wrong_entity_type_is_refused() {
        // A device is never the principal of `connect`.
        let msg = invalid(
            r#"permit (principal == Umbra::Device::"d1", action == Umbra::Action::"connect", resource);"#,
        );
        assert!(msg.contains("applicable action"), "{msg}");
        // Nor is a group the resource.
        invalid(r#"permit (principal, action, resource in Umbra::Group::"eng");"#);
    }

    #[test]
    fn wrong_action_is_refused() {
        let msg = invalid(r#"permit (principal, action == Umbra::Action::"read", resource);"#);
        assert!(msg.contains("read"), "{msg}");
        // An action outside the namespace is unknown too.
        invalid(r#"permit (principal, action == Action::"connect", resource);"#);
    }

    #[test]
    fn wrong_type_in_condition_is_refused() {
        invalid(r#"permit (principal, action, resource) when { context.now == "noon" };"#);
    }

    #[test]
    fn bidi_characters_are_refused_at_write_only() {
        let text =
            "permit (principal, action, resource) when { context.transport == \"quic\u{202e}\" };";
        let msg = invalid(text);
        assert!(msg.to_lowercase().contains("bidi"), "{msg}");
        let validator = Validator::new(schema::schema().unwrap());
        assert!(parse_stored(&validator, "p", text).is_ok());
    }

    #[test]
    fn templates_are_refused() {
        let err = validate_policy("permit (principal == ?principal, action, resource);");
        assert!(matches!(err, Err(PolicyError::Template(_))), "{err:?}");
    }

    #[test]
    fn stored_ids_follow_the_scheme() {
        let validator = Validator::new(schema::schema().unwrap());
        let text = format!("{EXAMPLE_USER}\n{EXAMPLE_USER}\n{EXAMPLE_USER}");
        let set = parse_stored(&validator, "web-access", &text).unwrap();
        let mut ids: Vec<String> = set.policies().map(|p| p.id().to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["web-access", "web-access#1", "web-access#2"]);
        let err = parse_stored(&validator, "bad", "permit (").unwrap_err();
        assert!(matches!(err, PolicyError::Stored { ref id, .. } if id == "bad"));
        assert!(!err.is_admin_input());
    }

    #[test]
    fn allow_policy_validates_for_every_subject() {
        for subject in [
            PolicySubject::User("alice@example.com".into()),
            PolicySubject::Group("eng".into()),
            PolicySubject::Everyone,
        ] {
            let text = allow_policy(&subject, "web");
            assert_eq!(validate_policy(&text), Ok(1), "{text}");
        }
    }

    #[test]
    fn allow_policy_escapes_ids() {
        let evil = r#"x\" ); permit (principal, action, resource); //"#;
        let service = "svc\"\\\n\u{1}é";
        // The injection attempt stays inside the literal: one policy, for that odd user only
        // (refused at write, since no stored user can have that id).
        let text = allow_policy(&PolicySubject::User(evil.into()), "web");
        let msg = invalid(&text);
        assert!(msg.contains("can never match"), "{msg}");
        assert!(Policy::parse(None, &text).is_ok(), "{text}");
        // Control characters round-trip too.
        let text = allow_policy(&PolicySubject::User(evil.into()), service);
        let p = Policy::parse(None, &text).unwrap();
        match p.principal_constraint() {
            PrincipalConstraint::Eq(uid) => assert_eq!(uid.id().unescaped(), evil),
            other => panic!("unexpected principal constraint {other:?}"),
        }
        match p.resource_constraint() {
            ResourceConstraint::Eq(uid) => assert_eq!(uid.id().unescaped(), service),
            other => panic!("unexpected resource constraint {other:?}"),
        }

        let text = allow_policy(&PolicySubject::Group(r#"a"b\c"#.into()), "web");
        let p = Policy::parse(None, &text).unwrap();
        match p.principal_constraint() {
            PrincipalConstraint::In(uid) => assert_eq!(uid.id().unescaped(), r#"a"b\c"#),
            other => panic!("unexpected principal constraint {other:?}"),
        }
    }

    /// A policy naming an id the controller can never store would silently never apply (a
    /// `forbid` that protects nothing): refused at write, naming the literal, wherever it is
    /// written (scope or condition). Stored ids in the same places still validate.
    #[test]
    fn ids_no_stored_object_can_have_are_refused() {
        for (text, shown, hint) in [
            (
                r#"forbid (principal == Umbra::User::"Mallory@Corp.example", action, resource);"#,
                r#"Umbra::User::"Mallory@Corp.example""#,
                r#"write Umbra::User::"mallory@corp.example""#,
            ),
            (
                r#"forbid (principal in Umbra::Group::"Eng", action, resource);"#,
                r#"Umbra::Group::"Eng""#,
                "lowercase",
            ),
            (
                r#"forbid (principal, action, resource == Umbra::Service::"DB");"#,
                r#"Umbra::Service::"DB""#,
                "lowercase",
            ),
            (
                // Cyrillic е in the group name, inside a condition.
                "permit (principal, action, resource) unless { principal in Umbra::Group::\"\u{435}ng\" };",
                "Umbra::Group::\"\u{435}ng\"",
                "lowercase",
            ),
            (
                r#"permit (principal == Umbra::User::"josé@example.com", action, resource);"#,
                r#"Umbra::User::"josé@example.com""#,
                "ASCII e-mail",
            ),
            (
                r#"forbid (principal, action, resource) when { context.device == Umbra::Device::"D-B3612D890D64C528" };"#,
                r#"Umbra::Device::"D-B3612D890D64C528""#,
                r#"write Umbra::Device::"d-b3612d890d64c528""#,
            ),
            (
                r#"forbid (principal, action, resource) when { context.device == Umbra::Device::"laptop-1" };"#,
                r#"Umbra::Device::"laptop-1""#,
                "16 lowercase hex",
            ),
            (
                "forbid (principal == Umbra::User::\"a\u{1b}@b.c\", action, resource);",
                r#"Umbra::User::"a\u{1b}@b.c""#,
                "ASCII e-mail",
            ),
        ] {
            let msg = invalid(text);
            assert!(msg.contains(shown), "{text}: {msg}");
            assert!(msg.contains(hint), "{text}: {msg}");
        }
        // The legitimate twins.
        for text in [
            r#"forbid (principal == Umbra::User::"mallory@corp.example", action, resource);"#,
            r#"forbid (principal in Umbra::Group::"eng", action, resource == Umbra::Service::"db");"#,
            r#"permit (principal, action, resource) unless { principal in Umbra::Group::"eng" };"#,
            r#"forbid (principal, action, resource) when { context.device == Umbra::Device::"d-b3612d890d64c528" };"#,
        ] {
            assert_eq!(validate_policy(text), Ok(1), "{text}");
        }
        // Stored policies load as they are (checked at write time only).
        let validator = Validator::new(schema::schema().unwrap());
        let old = r#"forbid (principal == Umbra::User::"Mallory@Corp.example", action, resource);"#;
        assert!(parse_stored(&validator, "old", old).is_ok());
    }

    #[test]
    fn line_col_counts_characters() {
        let text = "ab\ncé\nx";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 6), (2, 3));
        assert_eq!(line_col(text, 7), (3, 1));
        assert_eq!(line_col(text, 100), (3, 2));
    }
}
