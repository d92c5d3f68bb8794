//! Characteristics: what a driver guarantees, with tooz's names.

use std::fmt;
use std::str::FromStr;

/// A guarantee a driver offers. Each value's name is the one Python tooz uses
/// (`Characteristic::DistributedAcrossHosts.as_str() == "DISTRIBUTED_ACROSS_HOSTS"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Characteristic {
    /// Primitives behave correctly when used from several threads of one process.
    DistributedAcrossThreads,
    /// ... from several processes on one host.
    DistributedAcrossProcesses,
    /// ... from several hosts.
    DistributedAcrossHosts,
    /// Liveness does not rely on other clients' timeouts but on something sturdier
    /// (sessions, connections, the operating system).
    NonTimeoutBased,
    /// Each operation takes effect between its invocation and completion.
    Linearizable,
    /// Operations keep each process's program order.
    Sequential,
    /// Only causally related operations are ordered.
    Causal,
    /// The history equals some total order.
    Serializable,
    /// A client on a partitioned server sees the same data as the other side.
    SameViewUnderPartitions,
    /// Every client always reads the same thing regardless of server.
    SameViewAcrossClients,
}

impl Characteristic {
    /// All ten characteristics.
    pub const ALL: [Characteristic; 10] = [
        Characteristic::DistributedAcrossThreads,
        Characteristic::DistributedAcrossProcesses,
        Characteristic::DistributedAcrossHosts,
        Characteristic::NonTimeoutBased,
        Characteristic::Linearizable,
        Characteristic::Sequential,
        Characteristic::Causal,
        Characteristic::Serializable,
        Characteristic::SameViewUnderPartitions,
        Characteristic::SameViewAcrossClients,
    ];

    /// tooz's name for this characteristic.
    pub fn as_str(self) -> &'static str {
        match self {
            Characteristic::DistributedAcrossThreads => "DISTRIBUTED_ACROSS_THREADS",
            Characteristic::DistributedAcrossProcesses => "DISTRIBUTED_ACROSS_PROCESSES",
            Characteristic::DistributedAcrossHosts => "DISTRIBUTED_ACROSS_HOSTS",
            Characteristic::NonTimeoutBased => "NON_TIMEOUT_BASED",
            Characteristic::Linearizable => "LINEARIZABLE",
            Characteristic::Sequential => "SEQUENTIAL",
            Characteristic::Causal => "CAUSAL",
            Characteristic::Serializable => "SERIALIZABLE",
            Characteristic::SameViewUnderPartitions => "SAME_VIEW_UNDER_PARTITIONS",
            Characteristic::SameViewAcrossClients => "SAME_VIEW_ACROSS_CLIENTS",
        }
    }
}

impl fmt::Display for Characteristic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`Characteristic::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown characteristic {0:?}")]
pub struct UnknownCharacteristic(pub String);

impl FromStr for Characteristic {
    type Err = UnknownCharacteristic;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Characteristic::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownCharacteristic(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Characteristic::ALL {
            assert_eq!(c.as_str().parse::<Characteristic>(), Ok(c));
        }
        assert!("nope".parse::<Characteristic>().is_err());
    }
}
