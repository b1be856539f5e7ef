//! The runtime's root: the actor the scheduler and the manager are linked to. Nothing restarts
//! them (their state is every session's), so a failure of either is the runtime's: it is recorded
//! in the [`Health`](crate::Health) cell, and when the scheduler is the one lost, every session is
//! told to fail its turns at once instead of waiting for tokens that will not come. (When the
//! manager is lost its sessions are stopped with it, and each pending turn's stream ends with a
//! typed error as its sink drops.) Stopping the root stops everything under it.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::error::RuntimeError;
use crate::health::HealthCell;
use crate::manager::ManagerMsg;
use crate::scheduler::SchedulerMsg;

/// Messages of the root.
pub(crate) enum SupervisorMsg {
    /// The actors to watch, once spawned under the root.
    Watch {
        /// The manager.
        manager: ActorRef<ManagerMsg>,
        /// The scheduler.
        scheduler: ActorRef<SchedulerMsg>,
    },
}

/// The root's state.
pub(crate) struct SupervisorState {
    health: HealthCell,
    manager: Option<ActorRef<ManagerMsg>>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
}

/// The root actor.
pub(crate) struct SupervisorActor;

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = HealthCell;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        health: HealthCell,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            health,
            manager: None,
            scheduler: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Watch { manager, scheduler } => {
                st.manager = Some(manager);
                st.scheduler = Some(scheduler);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!("stopped ({})", reason.unwrap_or_else(|| "no reason".into())),
            ),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if st.scheduler.as_ref().is_some_and(|s| s.get_id() == id) {
            st.scheduler = None;
            let reason = format!("the scheduler {why}");
            st.health.fail(reason.clone());
            if let Some(m) = &st.manager {
                let _ = m.cast(ManagerMsg::Fail(RuntimeError::RuntimeFailed(reason)));
            }
        } else if st.manager.as_ref().is_some_and(|m| m.get_id() == id) {
            st.manager = None;
            st.health.fail(format!("the session manager {why}"));
        }
        Ok(())
    }
}
