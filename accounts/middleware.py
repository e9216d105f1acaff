"""Idle logoff and the second-factor gate (filled in by issue 9)."""


class IdleTimeoutMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)


class SecondFactorMiddleware(IdleTimeoutMiddleware):
    pass
