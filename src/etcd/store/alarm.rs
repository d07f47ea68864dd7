//! The alarms raised on this store, as etcd's alarm store keeps them
//! (`server/etcdserver/api/v3alarm/alarms.go`): one entry per (member, alarm type).
//!
//! Only NOSPACE has a meaning here: the store raises it when a write would take it over its
//! space quota, and while it is active the store refuses whatever could grow it (see
//! `quota.rs`). It stays until an administrator disarms it, as in etcd: freeing space does not
//! clear it by itself. Unlike etcd's, alarms are not kept across a restart: neither are the
//! keys, and a store that starts empty is under any quota.

use std::collections::BTreeSet;

use crate::etcd::pb::etcdserverpb::{AlarmMember, AlarmType};

#[derive(Debug, Default)]
pub struct Alarms {
    /// (member ID, alarm type); sorted, so that lists come in a stable order (etcd's come in
    /// Go map order).
    active: BTreeSet<(u64, i32)>,
}

impl Alarms {
    /// Raises `alarm` for `member`; returns it, as etcd does also when it was already raised.
    /// Returns whether it is newly raised too.
    pub fn activate(&mut self, member: u64, alarm: AlarmType) -> (AlarmMember, bool) {
        let new = self.active.insert((member, alarm as i32));
        (member_alarm(member, alarm as i32), new)
    }

    /// Clears `alarm` for `member`; returns it, or `None` when it was not raised.
    pub fn deactivate(&mut self, member: u64, alarm: AlarmType) -> Option<AlarmMember> {
        self.active.remove(&(member, alarm as i32)).then(|| member_alarm(member, alarm as i32))
    }

    /// The alarms of one type; [`AlarmType::None`] lists every alarm, as in etcd.
    pub fn get(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.active
            .iter()
            .filter(|(_, raised)| alarm == AlarmType::None || *raised == alarm as i32)
            .map(|&(member, raised)| member_alarm(member, raised))
            .collect()
    }

    /// Whether writes that could grow the store are refused.
    pub fn no_space(&self) -> bool {
        self.active.iter().any(|(_, raised)| *raised == AlarmType::Nospace as i32)
    }
}

fn member_alarm(member: u64, alarm: i32) -> AlarmMember {
    AlarmMember { member_id: member, alarm }
}

/// An alarm as etcd prints it in `Status.errors` (the protobuf text form, trailing space
/// included): `memberID:10276657743932975437 alarm:NOSPACE `.
pub fn describe(alarm: &AlarmMember) -> String {
    let name =
        AlarmType::try_from(alarm.alarm).map_or_else(|_| alarm.alarm.to_string(), |a| a.as_str_name().to_owned());
    format!("memberID:{} alarm:{name} ", alarm.member_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alarm_is_raised_once_per_member_and_cleared_by_its_own_member_only() {
        let mut alarms = Alarms::default();
        assert!(alarms.activate(7, AlarmType::Nospace).1);
        assert!(!alarms.activate(7, AlarmType::Nospace).1, "raised already");
        assert!(alarms.no_space());
        assert_eq!(alarms.deactivate(8, AlarmType::Nospace), None);
        assert!(alarms.no_space());
        assert_eq!(alarms.deactivate(7, AlarmType::Nospace), Some(member_alarm(7, AlarmType::Nospace as i32)));
        assert!(!alarms.no_space());
        assert!(alarms.get(AlarmType::None).is_empty());
    }

    #[test]
    fn none_lists_every_alarm_and_a_type_lists_its_own() {
        let mut alarms = Alarms::default();
        alarms.activate(2, AlarmType::Nospace);
        alarms.activate(1, AlarmType::Nospace);
        assert_eq!(alarms.get(AlarmType::None).iter().map(|a| a.member_id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(alarms.get(AlarmType::Nospace).len(), 2);
        assert!(alarms.get(AlarmType::Corrupt).is_empty());
    }

    #[test]
    fn alarms_are_described_as_etcd_prints_them_in_status_errors() {
        let alarm = member_alarm(10_276_657_743_932_975_437, AlarmType::Nospace as i32);
        assert_eq!(describe(&alarm), "memberID:10276657743932975437 alarm:NOSPACE ");
    }
}
