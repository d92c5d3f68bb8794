//! The cases, one module per topic, and the [`CASES`] table.
//!
//! Each case is an `async fn(&Harness) -> CaseResult` that returns an error instead
//! of panicking. Its name, `topic::what_it_checks`, is the contract it pins; the
//! doc comment of each module lists the tooz test each case stands for.

use crate::runner::Case;

mod capabilities;
mod contention;
mod events;
mod expiry;
mod faults;
mod groups;
mod heartbeat;
mod hooks;
mod input;
mod leader;
mod lifecycle;
mod locks;
mod membership;
mod partitioner;
mod util;
mod watch;

mod prelude {
    pub(crate) use std::collections::BTreeSet;
    pub(crate) use std::sync::Arc;
    pub(crate) use std::time::Duration;

    pub(crate) use serde_json::json;
    pub(crate) use tokio::time::Instant;
    pub(crate) use tooz_core::{
        Capabilities, Coordinator, GroupEvent, GroupId, LockName, MemberId, Mode, ToozError, Wait,
    };

    pub(crate) use super::util::*;
    pub(crate) use crate::{CaseError, CaseResult, Ctx, Harness};
}

/// Cases that need coordinators in several processes to share state (worker
/// processes, crashes).
const MULTI_PROCESS: &[&str] = &[
    "locks::other_process_cannot_take_held_lock",
    "locks::other_process_takes_released_lock",
    "contention::processes_never_overlap",
    "expiry::crashed_member_leaves",
    "expiry::crashed_holder_frees_lock",
];

/// Why a case does not apply to the driver under test (by its published
/// [`Features`](tooz_core::Features) and its URL), or `None` when it does.
pub(crate) fn not_applicable(name: &str, h: &crate::Harness) -> Option<&'static str> {
    let f = h.features();
    if name.starts_with("faults::") && !h.networked() {
        return Some("network faults: the backend is not reached over TCP");
    }
    if name.starts_with("faults::") && h.multi_host() {
        return Some(
            "network faults: the URL names several servers (host list or Sentinel) and the \
             client fails over past the fault proxy, which sits in front of the first one only",
        );
    }
    if name == "input::unreachable_backend_is_connection_error" && h.multi_host() {
        return Some(
            "an unreachable backend: only the first server of a multi-host URL is rewritten",
        );
    }
    if MULTI_PROCESS.contains(&name) && !f.is_some_and(|f| f.shared_across_processes) {
        return Some("several processes: the driver's state is not shared across processes");
    }
    if name == "input::unreachable_backend_is_connection_error"
        && !f.is_some_and(|f| f.external_state)
    {
        return Some("an unreachable backend: the driver's state lives in the process");
    }
    None
}

macro_rules! case_table {
    ($($module:ident :: $name:ident),* $(,)?) => {
        &[$(Case {
            name: concat!(stringify!($module), "::", stringify!($name)),
            run: |h| Box::pin($module::$name(h)),
        }),*]
    };
}

/// Every case of the suite, in report order.
pub static CASES: &[Case] = case_table![
    // groups (tooz TestAPI: groups)
    groups::create_then_listed,
    groups::create_existing_is_group_already_exist,
    groups::get_groups_lists_every_created_group,
    groups::text_group_id_round_trips,
    groups::non_utf8_group_id_round_trips,
    groups::delete_then_unlisted_and_join_fails,
    groups::delete_unknown_is_group_not_created,
    groups::delete_non_empty_is_group_not_empty,
    // membership
    membership::join_then_listed,
    membership::join_unknown_group_is_group_not_created,
    membership::join_group_create_lists_member,
    membership::join_group_create_existing_group_joins,
    membership::join_group_create_does_not_sleep,
    membership::join_twice_is_member_already_exist,
    membership::same_member_id_elsewhere_is_member_already_exist,
    membership::leave_then_unlisted,
    membership::leave_unknown_group_is_group_not_created,
    membership::leave_not_joined_is_member_not_joined,
    membership::get_members_is_exact,
    membership::non_utf8_member_id_round_trips,
    membership::stopped_member_is_gone,
    // capabilities
    capabilities::join_capabilities_round_trip,
    capabilities::nested_capabilities_round_trip,
    capabilities::no_capabilities_read_back_none,
    capabilities::members_with_capabilities_maps_member,
    capabilities::members_with_capabilities_multiple,
    capabilities::members_with_capabilities_unknown_group_is_group_not_created,
    capabilities::members_with_capabilities_empty_group_is_empty,
    capabilities::members_with_capabilities_without_caps_is_none,
    capabilities::member_capabilities_unknown_group_is_group_not_created,
    capabilities::member_capabilities_not_joined_is_member_not_joined,
    capabilities::member_info_has_capabilities_and_times,
    capabilities::member_info_nested_capabilities,
    capabilities::member_info_unknown_group_is_group_not_created,
    capabilities::member_info_not_joined_is_member_not_joined,
    capabilities::update_then_read_back,
    capabilities::update_unknown_group_is_group_not_created,
    capabilities::update_not_joined_is_member_not_joined,
    // heartbeat
    heartbeat::heartbeat_returns_interval,
    heartbeat::heart_runs_only_when_required,
    heartbeat::beating_member_stays_listed,
    // watchers (run_watchers, tooz semantics)
    watch::join_watch_sees_other_member,
    watch::leave_watch_sees_other_member,
    watch::watch_join_unknown_group_is_group_not_created,
    watch::watch_leave_unknown_group_is_group_not_created,
    watch::booted_out_member_forgets_group,
    watch::deleted_group_is_not_an_error,
    watch::unwatch_join_unknown_id_is_not_found,
    watch::unwatch_leave_unknown_id_is_not_found,
    watch::unwatch_leave_empties_table,
    watch::unwatch_elected_unknown_id_is_not_found,
    watch::unwatch_elected_empties_table,
    // hooks by WatchId (tooz TestHook)
    hooks::registered_callback_runs_once,
    hooks::nothing_to_report_is_empty,
    hooks::unwatched_callback_is_not_called,
    hooks::unwatch_twice_is_not_found,
    hooks::unwatch_wrong_kind_or_group_is_not_found,
    // leader election
    leader::run_for_election_elects_self,
    leader::elected_callback_fires_once_per_win,
    leader::get_leader_none_until_elected,
    leader::second_candidate_wins_after_leader_stops,
    leader::stand_down_hands_over_both_ways,
    leader::stand_down_reports_whether_leading,
    leader::unwatched_candidate_does_not_campaign,
    leader::leadership_tokens_increase,
    leader::become_leader_takes_over_when_leader_stops,
    // push event streams
    events::stream_sees_other_join_and_leave,
    events::stream_sees_leader_elected_and_lost,
    events::stream_of_unknown_group_is_group_not_created,
    events::stream_ends_on_stop,
    // locks (tooz TestAPI: locks)
    locks::acquire_release_then_release_again_false,
    locks::release_not_held_is_false,
    locks::two_objects_same_coordinator_exclude,
    locks::same_object_is_not_reentrant,
    locks::third_object_same_coordinator_excluded,
    locks::other_task_same_coordinator_excluded,
    locks::other_coordinator_excluded_then_acquires,
    locks::waiter_on_same_object_acquires_after_release,
    locks::holding_one_lock_survives_taking_another,
    locks::timed_wait_returns_false,
    locks::timed_guard_acquires_free_lock,
    locks::guard_or_fail_is_lock_acquire_failed,
    locks::guard_exposes_lock_and_token,
    locks::release_inside_guard_then_drop_is_harmless,
    locks::break_lock_frees_and_old_holder_release_false,
    locks::heartbeat_not_held_is_false,
    locks::other_process_cannot_take_held_lock,
    locks::other_process_takes_released_lock,
    locks::shared_acquire_release,
    locks::shared_same_object_twice_needs_two_releases,
    locks::shared_two_coordinators_share,
    locks::shared_excludes_exclusive,
    locks::exclusive_excludes_shared,
    locks::fencing_tokens_increase_across_holders,
    // mutual exclusion under contention
    contention::tasks_never_overlap,
    contention::processes_never_overlap,
    contention::waiter_wakes_promptly_on_release,
    // lifecycle and cancellation
    lifecycle::started_status,
    lifecycle::stop_before_start_is_not_started,
    lifecycle::start_twice_is_already_started,
    lifecycle::calls_before_start_are_not_started,
    lifecycle::restart_after_stop,
    lifecycle::stop_releases_locks,
    lifecycle::stop_leaves_groups,
    lifecycle::stop_wakes_waiter_with_stopped,
    lifecycle::dropped_acquire_does_not_leak,
    lifecycle::acquire_dropped_in_flight_leaves_no_hold,
    lifecycle::guard_drop_releases,
    lifecycle::guard_release_reports,
    lifecycle::lost_fires_on_stop,
    // expiry and crashes
    expiry::crashed_member_leaves,
    expiry::crashed_holder_frees_lock,
    expiry::silent_member_matches_timeout_characteristic,
    // lease safety through network faults (backends reached over TCP)
    faults::lock_loss_is_signalled_before_another_holder_gets_it,
    faults::leadership_loss_is_signalled_before_another_leader_is_elected,
    faults::acquire_whose_reply_was_lost_leaves_no_hold,
    faults::release_whose_reply_was_lost_frees_the_lock,
    faults::short_cut_within_the_margin_loses_nothing,
    // bad input
    input::empty_group_id_is_invalid_id,
    input::empty_member_id_is_invalid_id,
    input::empty_lock_name_is_invalid_id,
    input::oversized_ids_are_invalid_id,
    input::unknown_scheme_is_invalid_url,
    input::malformed_url_is_invalid_url,
    input::unknown_option_is_invalid_option,
    input::bad_option_value_is_invalid_option,
    input::missing_characteristic_is_driver_chosen_poorly,
    input::unreachable_backend_is_connection_error,
    // partitioner
    partitioner::join_partitioned_group_lists_self,
    partitioner::ring_follows_joins_and_leaves,
    partitioner::weights_come_from_capabilities,
    partitioner::owners_agree_across_coordinators,
    partitioner::hash_compatible_with_python_tooz,
    partitioner::leave_of_unknown_member_is_not_an_error,
    partitioner::stopped_partitioner_stops_following,
];
