//! Conversions between protos and Rust types that several parts of Kiln make: durations
//! (timeouts, keep-alives) and an action's platform properties.

use kiln_proto::reapi::{Action, Command};
use std::time::Duration;

/// A proto duration as a Rust one; a negative duration is zero (REAPI gives no meaning to
/// negative timeouts, and a client's is not allowed to panic or wrap the server).
pub fn duration(d: &prost_types::Duration) -> Duration {
    // In i128, where no field values overflow (prost's own conversion panics on i64::MIN).
    let nanos = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    if nanos <= 0 {
        return Duration::ZERO;
    }
    // At most i64::MAX seconds and a few more: fits.
    Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    )
}

/// A Rust duration as a proto one (saturating at the largest proto duration).
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

/// The platform properties an action asks for, as name/value pairs in the order sent: the
/// Action's platform, or for older clients the Command's (deprecated there since v2.2).
pub fn platform_properties(action: &Action, command: &Command) -> Vec<(String, String)> {
    #[allow(deprecated)]
    let command_platform = command.platform.as_ref();
    action
        .platform
        .as_ref()
        .or(command_platform)
        .map(|p| {
            p.properties
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{platform::Property, Platform};

    #[test]
    fn durations_round_trip_and_negative_ones_are_zero() {
        let d = Duration::new(90, 5);
        assert_eq!(duration(&proto_duration(d)), d);
        let negative = prost_types::Duration {
            seconds: -3,
            nanos: 0,
        };
        assert_eq!(duration(&negative), Duration::ZERO);
        // Unnormalised: nanos past a second carry into the seconds.
        let odd = prost_types::Duration {
            seconds: 1,
            nanos: 1_500_000_000,
        };
        assert_eq!(duration(&odd), Duration::from_millis(2500));
        let extreme = prost_types::Duration {
            seconds: i64::MIN,
            nanos: i32::MIN,
        };
        assert_eq!(duration(&extreme), Duration::ZERO);
        let largest = prost_types::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert_eq!(duration(&largest).as_secs(), i64::MAX as u64 + 2);
        assert_eq!(proto_duration(Duration::MAX).seconds, i64::MAX);
    }

    #[test]
    fn the_actions_platform_wins_over_the_commands() {
        let platform = |v: &str| Platform {
            properties: vec![Property {
                name: "OSFamily".into(),
                value: v.into(),
            }],
        };
        #[allow(deprecated)]
        let command = Command {
            platform: Some(platform("linux")),
            ..Default::default()
        };
        let mut action = Action::default();
        assert_eq!(
            platform_properties(&action, &command),
            vec![("OSFamily".to_string(), "linux".to_string())]
        );
        action.platform = Some(platform("macos"));
        assert_eq!(
            platform_properties(&action, &command),
            vec![("OSFamily".to_string(), "macos".to_string())]
        );
        assert!(platform_properties(&Action::default(), &Command::default()).is_empty());
    }
}
