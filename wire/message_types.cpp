// Which type bytes each side may send after startup, for rejecting garbage early.
#include "wire/message_types.hpp"

namespace pgwarden::wire {

bool is_frontend_type(char type) {
    switch (type) {
        case fe::kBind:
        case fe::kClose:
        case fe::kCopyData:
        case fe::kCopyDone:
        case fe::kCopyFail:
        case fe::kDescribe:
        case fe::kExecute:
        case fe::kFlush:
        case fe::kFunctionCall:
        case fe::kParse:
        case fe::kPassword:
        case fe::kQuery:
        case fe::kSync:
        case fe::kTerminate: return true;
        default: return false;
    }
}

bool is_backend_type(char type) {
    switch (type) {
        case be::kAuthentication:
        case be::kBackendKeyData:
        case be::kBindComplete:
        case be::kCloseComplete:
        case be::kCommandComplete:
        case be::kCopyBothResponse:
        case be::kCopyData:
        case be::kCopyDone:
        case be::kCopyInResponse:
        case be::kCopyOutResponse:
        case be::kDataRow:
        case be::kEmptyQueryResponse:
        case be::kErrorResponse:
        case be::kFunctionCallResponse:
        case be::kNegotiateProtocolVersion:
        case be::kNoData:
        case be::kNoticeResponse:
        case be::kNotificationResponse:
        case be::kParameterDescription:
        case be::kParameterStatus:
        case be::kParseComplete:
        case be::kPortalSuspended:
        case be::kReadyForQuery:
        case be::kRowDescription: return true;
        default: return false;
    }
}

}  // namespace pgwarden::wire
